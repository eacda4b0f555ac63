//! [`Zone`]: the records of a [`DnsServer`](super::DnsServer) and the answer to one query,
//! built as the recursive resolver of a workload's resolv.conf builds it. A pure function of
//! the zone and the query, so that the unit tests below check it without a namespace.
//!
//! For a name with a CNAME the answer holds the whole chain, each CNAME and then the last
//! name's records; an unknown name is NXDOMAIN, a known name without records of the asked type
//! is NODATA (NOERROR, no answer), both with the SOA of `test.` in the authority section for
//! negative caching. Over UDP an answer longer than the query allows (512 bytes, or its EDNS
//! payload size) is cut down to its question with TC set, and glibc asks again over TCP.
//!
//! Network safety: every name a zone holds is under `.test` and every address is a
//! documentation (TEST-NET, 2001:db8::/32), loopback or unspecified one; setting anything else
//! panics.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use hickory_proto::{
    op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode},
    rr::{
        DNSClass, Name, RData, Record, RecordType,
        rdata::{A, AAAA, CNAME, SOA},
    },
};

/// How many CNAMEs an answer follows before it gives up with SERVFAIL (a loop, or a chain
/// longer than resolvers follow: unbound stops at 11, BIND at 16).
pub const MAX_CNAME_HOPS: usize = 16;

/// The TTL of the SOA record in negative answers, and its `minimum` (the negative TTL).
pub const NEGATIVE_TTL: u32 = 30;

/// The largest UDP answer to a query without EDNS (RFC 1035 4.2.1).
const UDP_PLAIN: usize = 512;

/// The EDNS payload size the server announces (the DNS flag day 2020 value).
const EDNS_PAYLOAD: u16 = 1232;

/// How a query reached the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// One datagram on 53/udp: the answer is truncated to what the query allows.
    Udp,
    /// Length-prefixed on 53/tcp (RFC 1035 4.2.2): the whole answer.
    Tcp,
}

/// One question that reached a [`DnsServer`](super::DnsServer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Asked {
    /// The question name, lowercase, without the final dot (`api.egress.test`).
    pub name: String,
    /// The question type (A, AAAA, ...).
    pub qtype: RecordType,
    /// Over which transport.
    pub transport: Transport,
}

/// The records of one name.
#[derive(Clone, Debug)]
enum Node {
    /// An alias: nothing else may sit at the name (RFC 1034 3.6.2).
    Cname { target: Name, ttl: u32 },
    /// Addresses; `None` and an empty set both answer NODATA for that type.
    Addrs {
        a: Option<(Vec<Ipv4Addr>, u32)>,
        aaaa: Option<(Vec<Ipv6Addr>, u32)>,
    },
}

impl Node {
    const EMPTY: Node = Node::Addrs {
        a: None,
        aaaa: None,
    };

    /// The records of an address node that answer `qtype`, owned by `owner`.
    fn records(&self, owner: &Name, qtype: RecordType) -> Vec<Record> {
        let Node::Addrs { a, aaaa } = self else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if matches!(qtype, RecordType::A | RecordType::ANY)
            && let Some((ips, ttl)) = a
        {
            out.extend(
                ips.iter()
                    .map(|ip| Record::from_rdata(owner.clone(), *ttl, RData::A(A(*ip)))),
            );
        }
        if matches!(qtype, RecordType::AAAA | RecordType::ANY)
            && let Some((ips, ttl)) = aaaa
        {
            out.extend(
                ips.iter()
                    .map(|ip| Record::from_rdata(owner.clone(), *ttl, RData::AAAA(AAAA(*ip)))),
            );
        }
        out
    }
}

/// The records a [`DnsServer`](super::DnsServer) answers from: names under `.test` with A, AAAA or CNAME
/// records, each set with its TTL. Names are case-insensitive, with or without the final dot.
#[derive(Clone, Debug, Default)]
pub struct Zone {
    nodes: HashMap<String, Node>,
}

impl Zone {
    /// An empty zone: every name is NXDOMAIN.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the A records of `name` to `ips` (replacing its A records, or a CNAME; an empty
    /// list makes A queries NODATA while the name exists).
    pub fn set_a(&mut self, name: &str, ips: &[Ipv4Addr], ttl: u32) {
        for ip in ips {
            assert_safe((*ip).into());
        }
        let node = self.addrs_node(name);
        if let Node::Addrs { a, .. } = node {
            *a = Some((ips.to_vec(), ttl));
        }
    }

    /// Sets the AAAA records of `name` to `ips`, as [`Zone::set_a`] does the A records.
    pub fn set_aaaa(&mut self, name: &str, ips: &[Ipv6Addr], ttl: u32) {
        for ip in ips {
            assert_safe((*ip).into());
        }
        let node = self.addrs_node(name);
        if let Node::Addrs { aaaa, .. } = node {
            *aaaa = Some((ips.to_vec(), ttl));
        }
    }

    /// Makes `name` an alias of `target` (replacing whatever `name` had). `target` need not
    /// exist: then the answer is the CNAME and NXDOMAIN, as a resolver gives.
    pub fn set_cname(&mut self, name: &str, target: &str, ttl: u32) {
        let target = test_name(target);
        self.nodes
            .insert(key(&test_name(name)), Node::Cname { target, ttl });
    }

    /// Removes `name` and all its records: it is NXDOMAIN from now on.
    pub fn remove(&mut self, name: &str) {
        self.nodes.remove(&key(&test_name(name)));
    }

    /// The node of `name` as an address node: created if missing, a CNAME replaced.
    fn addrs_node(&mut self, name: &str) -> &mut Node {
        let node = self
            .nodes
            .entry(key(&test_name(name)))
            .or_insert(Node::EMPTY);
        if matches!(node, Node::Cname { .. }) {
            *node = Node::EMPTY;
        }
        node
    }

    /// The answer to `request`, as a recursive resolver gives it: the id, opcode, question,
    /// RD and CD of the request, QR, AA and RA set; for a query of one question of class IN,
    /// the CNAME chain from the question name (at most [`MAX_CNAME_HOPS`]) and then the
    /// records of the asked type at its end, NXDOMAIN when a name on the way does not exist,
    /// NOERROR with no answer (NODATA) when the last one has no records of that type, both
    /// with the SOA of `test.`; SERVFAIL for a longer chain (a loop). FORMERR for a question
    /// count other than one, NOTIMP for another opcode, REFUSED for another class. An OPT in
    /// the request gets one in the answer.
    pub fn respond(&self, request: &Message) -> Message {
        let mut response = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
        response.metadata = Metadata::response_from_request(&request.metadata);
        response.metadata.authoritative = true;
        response.metadata.recursion_available = true;
        response.queries = request.queries.clone();
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD);
            response.edns = Some(edns);
        }
        let code = if request.metadata.op_code != OpCode::Query {
            ResponseCode::NotImp
        } else if request.queries.len() != 1 {
            ResponseCode::FormErr
        } else if request.queries[0].query_class() != DNSClass::IN {
            ResponseCode::Refused
        } else {
            let query = &request.queries[0];
            self.resolve(query.name(), query.query_type(), &mut response)
        };
        response.metadata.response_code = code;
        response
    }

    /// Fills the answer (and, when negative, authority) section of `response` for `qname`
    /// and `qtype`, and returns the response code.
    fn resolve(&self, qname: &Name, qtype: RecordType, response: &mut Message) -> ResponseCode {
        let mut owner = qname.clone();
        for _ in 0..=MAX_CNAME_HOPS {
            let Some(node) = self.nodes.get(&key(&owner)) else {
                response.authorities.push(soa());
                return ResponseCode::NXDomain;
            };
            match node {
                Node::Cname { target, ttl } if qtype != RecordType::CNAME => {
                    response.answers.push(Record::from_rdata(
                        owner,
                        *ttl,
                        RData::CNAME(CNAME(target.clone())),
                    ));
                    owner = target.clone();
                }
                Node::Cname { target, ttl } => {
                    response.answers.push(Record::from_rdata(
                        owner,
                        *ttl,
                        RData::CNAME(CNAME(target.clone())),
                    ));
                    return ResponseCode::NoError;
                }
                Node::Addrs { .. } => {
                    let records = node.records(&owner, qtype);
                    if records.is_empty() {
                        response.authorities.push(soa());
                    }
                    response.answers.extend(records);
                    return ResponseCode::NoError;
                }
            }
        }
        response.answers.clear();
        ResponseCode::ServFail
    }
}

/// The reply to the DNS message `query` (wire format) that came over `transport`, in wire
/// format (without TCP's length prefix), and the question it asked; `None` for what gets no
/// reply (not a DNS message, or a response). Over UDP an answer longer than the query allows
/// (512 bytes, or its EDNS payload size) is cut down to its header and question with TC set.
pub fn answer(zone: &Zone, query: &[u8], transport: Transport) -> Option<(Vec<u8>, Option<Asked>)> {
    let request = Message::from_vec(query).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let asked = request.queries.first().map(|q| Asked {
        name: display_name(q.name()),
        qtype: q.query_type(),
        transport,
    });
    let response = zone.respond(&request);
    let mut bytes = response.to_vec().expect("encoding a DNS answer");
    if transport == Transport::Udp {
        let limit = request
            .edns
            .as_ref()
            .map_or(UDP_PLAIN, |e| usize::from(e.max_payload()).max(UDP_PLAIN));
        if bytes.len() > limit {
            bytes = response
                .truncate()
                .to_vec()
                .expect("encoding a truncated answer");
        }
    }
    Some((bytes, asked))
}

/// The SOA of `test.`, for the authority section of negative answers.
fn soa() -> Record {
    let name = |s: &str| Name::from_ascii(s).expect("a valid name");
    Record::from_rdata(
        name("test."),
        NEGATIVE_TTL,
        RData::SOA(SOA::new(
            name("ns.test."),
            name("hostmaster.test."),
            1,
            3600,
            600,
            86400,
            NEGATIVE_TTL,
        )),
    )
}

/// `name` as a fully qualified [`Name`]; panics unless it is valid and under `.test`.
fn test_name(name: &str) -> Name {
    let mut parsed = Name::from_ascii(name).unwrap_or_else(|e| panic!("DNS name {name:?}: {e}"));
    parsed.set_fqdn(true);
    assert!(
        key(&parsed).ends_with(".test."),
        "{name:?} is not under .test: the test DNS server only holds made-up names"
    );
    parsed
}

/// The zone's key of `name`: lowercase, fully qualified.
fn key(name: &Name) -> String {
    let mut name = name.to_lowercase();
    name.set_fqdn(true);
    name.to_ascii()
}

/// `name` as the counters spell it: lowercase, without the final dot.
fn display_name(name: &Name) -> String {
    key(name).trim_end_matches('.').to_owned()
}

/// Panics unless `ip` is on this machine whatever the network: a documentation, loopback or
/// unspecified address (or the IPv4-mapped form of one).
fn assert_safe(ip: IpAddr) {
    fn safe(ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => {
                v4.is_loopback()
                    || v4.is_unspecified()
                    || matches!(
                        v4.octets(),
                        [192, 0, 2, _]
                            | [198, 51, 100, _]
                            | [203, 0, 113, _]
                            | [198, 18 | 19, _, _]
                    )
            }
            IpAddr::V6(v6) => {
                v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.segments()[..2] == [0x2001, 0xdb8]
                    || v6.to_ipv4_mapped().is_some_and(|v4| safe(v4.into()))
            }
        }
    }
    assert!(
        safe(ip),
        "{ip} is not a documentation, benchmarking (198.18.0.0/15) or loopback address: tests never hand out others"
    );
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Query;

    use super::*;

    const V4_1: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
    const V4_2: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);
    const V6_1: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 10);

    fn name(s: &str) -> Name {
        Name::from_ascii(s).expect("name")
    }

    fn request(qname: &str, qtype: RecordType) -> Message {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(name(qname), qtype));
        m
    }

    /// (owner, type, data) of each answer record, as text.
    fn answers(m: &Message) -> Vec<(String, RecordType, String)> {
        m.answers
            .iter()
            .map(|r| (r.name.to_ascii(), r.record_type(), r.data.to_string()))
            .collect()
    }

    fn zone() -> Zone {
        let mut z = Zone::new();
        z.set_a("api.egress.test", &[V4_1, V4_2], 60);
        z.set_aaaa("api.egress.test", &[V6_1], 30);
        z.set_cname("www.egress.test", "cdn.egress.test.", 300);
        z.set_cname("cdn.egress.test", "api.egress.test", 120);
        z
    }

    #[test]
    fn a_and_aaaa_answer_with_the_header_of_a_recursive_resolver() {
        let z = zone();
        let got = z.respond(&request("API.egress.test.", RecordType::A));
        assert_eq!(got.metadata.id, 0x1234);
        assert_eq!(got.metadata.message_type, MessageType::Response);
        assert!(got.metadata.authoritative && got.metadata.recursion_available);
        assert!(got.metadata.recursion_desired, "RD is echoed");
        assert_eq!(got.metadata.response_code, ResponseCode::NoError);
        assert_eq!(
            got.queries,
            request("API.egress.test.", RecordType::A).queries
        );
        assert_eq!(
            answers(&got),
            [
                (
                    "API.egress.test.".into(),
                    RecordType::A,
                    "192.0.2.10".into()
                ),
                (
                    "API.egress.test.".into(),
                    RecordType::A,
                    "192.0.2.11".into()
                ),
            ]
        );
        assert!(got.answers.iter().all(|r| r.ttl == 60));
        assert!(got.authorities.is_empty());

        let mut no_rd = request("api.egress.test", RecordType::AAAA);
        no_rd.metadata.recursion_desired = false;
        let got = z.respond(&no_rd);
        assert!(!got.metadata.recursion_desired);
        assert_eq!(
            answers(&got),
            [(
                "api.egress.test".into(),
                RecordType::AAAA,
                "2001:db8::a".into()
            )]
        );
        assert_eq!(got.answers[0].ttl, 30);
    }

    #[test]
    fn a_cname_chain_is_answered_whole_then_the_last_names_records() {
        let got = zone().respond(&request("www.egress.test.", RecordType::A));
        assert_eq!(got.metadata.response_code, ResponseCode::NoError);
        assert_eq!(
            answers(&got),
            [
                (
                    "www.egress.test.".into(),
                    RecordType::CNAME,
                    "cdn.egress.test.".into()
                ),
                (
                    "cdn.egress.test.".into(),
                    RecordType::CNAME,
                    "api.egress.test.".into()
                ),
                (
                    "api.egress.test.".into(),
                    RecordType::A,
                    "192.0.2.10".into()
                ),
                (
                    "api.egress.test.".into(),
                    RecordType::A,
                    "192.0.2.11".into()
                ),
            ]
        );
        let ttls: Vec<u32> = got.answers.iter().map(|r| r.ttl).collect();
        assert_eq!(ttls, [300, 120, 60, 60]);

        // Asked for the CNAME itself: that one record.
        let got = zone().respond(&request("www.egress.test.", RecordType::CNAME));
        assert_eq!(
            answers(&got),
            [(
                "www.egress.test.".into(),
                RecordType::CNAME,
                "cdn.egress.test.".into()
            )]
        );
    }

    #[test]
    fn unknown_names_are_nxdomain_and_missing_types_nodata() {
        let mut z = zone();
        let got = z.respond(&request("nothing.egress.test.", RecordType::A));
        assert_eq!(got.metadata.response_code, ResponseCode::NXDomain);
        assert!(got.answers.is_empty());
        assert_eq!(got.authorities[0].record_type(), RecordType::SOA);

        // A name that exists with other records only: NODATA.
        z.set_a("v4only.egress.test", &[V4_1], 60);
        for qtype in [RecordType::AAAA, RecordType::MX, RecordType::CNAME] {
            let got = z.respond(&request("v4only.egress.test.", qtype));
            assert_eq!(got.metadata.response_code, ResponseCode::NoError, "{qtype}");
            assert!(got.answers.is_empty(), "{qtype}");
            assert_eq!(got.authorities.len(), 1, "{qtype}: the SOA");
        }
        // An empty set is NODATA too.
        z.set_a("v4only.egress.test", &[], 60);
        let got = z.respond(&request("v4only.egress.test.", RecordType::A));
        assert_eq!(got.metadata.response_code, ResponseCode::NoError);
        assert!(got.answers.is_empty());

        // A CNAME to nowhere: the CNAME, and NXDOMAIN for its target.
        z.set_cname("dangling.egress.test", "gone.egress.test", 60);
        let got = z.respond(&request("dangling.egress.test.", RecordType::A));
        assert_eq!(got.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(answers(&got).len(), 1);

        z.remove("API.egress.test.");
        let got = z.respond(&request("www.egress.test.", RecordType::A));
        assert_eq!(got.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(answers(&got).len(), 2, "the chain up to the missing name");
    }

    #[test]
    fn records_change_between_queries() {
        let mut z = zone();
        z.set_a("api.egress.test", &[V4_2], 5);
        let got = z.respond(&request("api.egress.test.", RecordType::A));
        assert_eq!(answers(&got)[0].2, "192.0.2.11");
        assert_eq!(got.answers.len(), 1);
        // An address set replaces a CNAME, and a CNAME an address set.
        z.set_a("www.egress.test", &[V4_1], 5);
        let got = z.respond(&request("www.egress.test.", RecordType::A));
        assert_eq!(
            answers(&got),
            [(
                "www.egress.test.".into(),
                RecordType::A,
                "192.0.2.10".into()
            )]
        );
        z.set_cname("api.egress.test", "www.egress.test", 5);
        let got = z.respond(&request("api.egress.test.", RecordType::AAAA));
        assert_eq!(got.answers.len(), 1, "the CNAME, then NODATA: {got:?}");
        assert_eq!(got.metadata.response_code, ResponseCode::NoError);
    }

    #[test]
    fn chains_longer_than_the_limit_and_loops_are_servfail() {
        let mut z = Zone::new();
        let hop = |i: usize| format!("h{i}.egress.test");
        for i in 0..MAX_CNAME_HOPS {
            z.set_cname(&hop(i), &hop(i + 1), 60);
        }
        z.set_a(&hop(MAX_CNAME_HOPS), &[V4_1], 60);
        let got = z.respond(&request(&hop(0), RecordType::A));
        assert_eq!(got.metadata.response_code, ResponseCode::NoError);
        assert_eq!(got.answers.len(), MAX_CNAME_HOPS + 1);

        z.set_cname(&hop(MAX_CNAME_HOPS), &hop(MAX_CNAME_HOPS + 1), 60);
        z.set_a(&hop(MAX_CNAME_HOPS + 1), &[V4_1], 60);
        let got = z.respond(&request(&hop(0), RecordType::A));
        assert_eq!(got.metadata.response_code, ResponseCode::ServFail);
        assert!(got.answers.is_empty());

        z.set_cname("loop.egress.test", "loop.egress.test", 60);
        let got = z.respond(&request("loop.egress.test", RecordType::A));
        assert_eq!(got.metadata.response_code, ResponseCode::ServFail);
    }

    #[test]
    fn odd_requests_get_error_codes() {
        let z = zone();
        let mut two = request("api.egress.test.", RecordType::A);
        two.add_query(Query::query(name("www.egress.test."), RecordType::A));
        assert_eq!(
            z.respond(&two).metadata.response_code,
            ResponseCode::FormErr
        );
        let mut status = request("api.egress.test.", RecordType::A);
        status.metadata.op_code = OpCode::Status;
        assert_eq!(
            z.respond(&status).metadata.response_code,
            ResponseCode::NotImp
        );
        let mut chaos = request("api.egress.test.", RecordType::A);
        chaos.queries[0].set_query_class(DNSClass::CH);
        assert_eq!(
            z.respond(&chaos).metadata.response_code,
            ResponseCode::Refused
        );
    }

    #[test]
    fn the_wire_answer_round_trips_and_is_truncated_over_udp_only() {
        let mut z = zone();
        let query = request("api.egress.test.", RecordType::A)
            .to_vec()
            .expect("encode");
        let (bytes, asked) = answer(&z, &query, Transport::Udp).expect("an answer");
        let got = Message::from_vec(&bytes).expect("decode");
        assert_eq!(got.metadata.id, 0x1234);
        assert_eq!(got.answers.len(), 2);
        assert_eq!(
            asked,
            Some(Asked {
                name: "api.egress.test".into(),
                qtype: RecordType::A,
                transport: Transport::Udp
            })
        );

        // 40 A records (16 bytes each after the first) do not fit in 512 bytes.
        let many: Vec<Ipv4Addr> = (1..=40).map(|i| Ipv4Addr::new(198, 51, 100, i)).collect();
        z.set_a("many.egress.test", &many, 60);
        let query = request("many.egress.test.", RecordType::A)
            .to_vec()
            .expect("encode");
        let (bytes, _) = answer(&z, &query, Transport::Udp).expect("an answer");
        let got = Message::from_vec(&bytes).expect("decode");
        assert!(got.metadata.truncation, "TC over UDP");
        assert!(got.answers.is_empty());
        assert_eq!(got.queries.len(), 1);
        let (bytes, _) = answer(&z, &query, Transport::Tcp).expect("an answer");
        let got = Message::from_vec(&bytes).expect("decode");
        assert!(!got.metadata.truncation);
        assert_eq!(got.answers.len(), 40);

        // With EDNS (1232 bytes) they fit, and the answer carries an OPT.
        let mut edns_query = request("many.egress.test.", RecordType::A);
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        edns_query.set_edns(edns);
        let (bytes, _) =
            answer(&z, &edns_query.to_vec().expect("encode"), Transport::Udp).expect("an answer");
        let got = Message::from_vec(&bytes).expect("decode");
        assert!(!got.metadata.truncation);
        assert_eq!(got.answers.len(), 40);
        assert!(got.edns.is_some());

        // Garbage and responses get no reply.
        assert!(answer(&z, b"\x12", Transport::Udp).is_none());
        let mut response = request("api.egress.test.", RecordType::A);
        response.metadata.message_type = MessageType::Response;
        assert!(answer(&z, &response.to_vec().expect("encode"), Transport::Udp).is_none());
    }

    #[test]
    #[should_panic(expected = "not under .test")]
    fn only_test_names_are_held() {
        Zone::new().set_a("example.com", &[V4_1], 60);
    }

    #[test]
    #[should_panic(
        expected = "is not a documentation, benchmarking (198.18.0.0/15) or loopback address"
    )]
    fn only_documentation_addresses_are_handed_out() {
        Zone::new().set_a("bad.egress.test", &[Ipv4Addr::new(10, 0, 0, 1)], 60);
    }
}
