//! DNS messages as the agent handles them: a workload's query in, the resolver's answer read
//! for what it teaches, and a SERVFAIL out when it teaches nothing usable.
//!
//! All wire-format work is hickory-proto's; this module decides what to trust. The rules, each
//! for a concrete reason:
//! - An answer is learned from only when it answers *this* query: response bit, same id, same
//!   single question. The agent holds several queries in flight; an answer matched to the
//!   wrong one would open the kernel for addresses of a name the policy never allowed.
//! - Only the answer section counts, and in it only the CNAME chain from the question name and
//!   the A/AAAA records owned by the chain's last name. A resolver (or a spoofer racing it) can
//!   put `198.51.100.7 A` for any name in the additional section; a workload's stub resolver
//!   ignores those, so the agent must too.
//! - A chain longer than [`MAX_CNAME_HOPS`] or a loop is an error, not a partial answer: the
//!   workload gets SERVFAIL (see [`servfail`]) rather than an answer whose addresses the kernel
//!   would refuse.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use hickory_proto::{
    ProtoError,
    op::{Edns, Header, Message, MessageType, OpCode, Query as Question, ResponseCode},
    rr::{DNSClass, Name, RData, Record, RecordType},
    serialize::binary::{BinDecodable as _, BinDecoder, DecodeError},
};

/// The most CNAME hops followed from the question name. Recursive resolvers give up on chains
/// around this length themselves, so a longer one in an answer is broken or hostile, and each
/// hop is one more name the policy would have to be asked about.
pub const MAX_CNAME_HOPS: usize = 16;

/// The UDP payload size a SERVFAIL advertises when the query carried EDNS: 1232 bytes, the
/// size DNS Flag Day 2020 settled on so that answers are not fragmented on any usual MTU.
const EDNS_PAYLOAD: u16 = 1232;

/// What is wrong with a query or an answer; each message is short, for one log line.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// The bytes are not a DNS message hickory-proto can decode.
    #[error("malformed dns message")]
    Decode(#[source] DecodeError),
    /// A decoded message could not be encoded again (in [`cap_ttls`]).
    #[error("cannot re-encode dns message")]
    Encode(#[source] ProtoError),
    /// A query was expected and the QR bit says response: a workload does not send responses,
    /// and echoing one to the resolver would be a reflection.
    #[error("expected a query, got a response (qr=1)")]
    NotAQuery,
    /// A response was expected and the QR bit says query: nothing to learn from it.
    #[error("expected a response, got a query (qr=0)")]
    NotAResponse,
    /// The opcode is not QUERY (0): NOTIFY, UPDATE and the like carry no answer to learn.
    #[error("opcode {} is not QUERY", OpCode::from_u8(*.0))]
    OpCode(u8),
    /// Not exactly one question: every resolver in use answers one question per message, and
    /// with two there is no saying which the answer's addresses belong to.
    #[error("{0} questions, expected exactly one")]
    QuestionCount(usize),
    /// The question's class is not IN: CHAOS and HESIOD names have no addresses to allow.
    #[error("question class {} is not IN", DNSClass::from(*.0))]
    Class(u16),
    /// The answer's id is not the query's: it answers another query, or it is spoofed.
    #[error("answer id {got} does not match query id {expected}")]
    IdMismatch {
        /// The query's id.
        expected: u16,
        /// The answer's id.
        got: u16,
    },
    /// The answer's question is not the query's (name, type or class).
    #[error("answer question {got} does not match the query's {expected}")]
    QuestionMismatch {
        /// The query's question, as `name TYPE` (normalised name).
        expected: String,
        /// The answer's question, as `name TYPE` (normalised name).
        got: String,
    },
    /// The CNAME chain comes back to a name already on it.
    #[error("cname loop at {name}")]
    CnameLoop {
        /// The first name seen twice (normalised).
        name: String,
    },
    /// The CNAME chain goes on past [`MAX_CNAME_HOPS`].
    #[error("cname chain longer than {MAX_CNAME_HOPS} hops")]
    CnameChainTooLong,
}

/// A query as a workload sent it, checked and ready to be matched with its answer.
///
/// Only [`parse_query`] makes one, so holding a `Query` means the bytes passed its checks. The
/// question is kept as sent, case included: [`parse_answer`] compares the answer's question
/// with it and [`servfail`] echoes it, and a stub using 0x20 case randomisation (`wWw.wIkI...`)
/// drops a reply whose question case differs from what it sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    id: u16,
    name: String,
    qtype: u16,
    question: Question,
    recursion_desired: bool,
    checking_disabled: bool,
    /// `Some(DO bit)` when the query carried an EDNS OPT record: RFC 6891 wants an OPT in the
    /// reply then, and RFC 3225 wants the DO bit copied.
    edns_dnssec_ok: Option<bool>,
}

impl Query {
    /// The message id, which the answer must carry too.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// The question name, normalised for comparing with a policy's host names: ASCII
    /// lowercase, no trailing dot, the root as `""`. IDN labels stay in their `xn--` form;
    /// a byte that is not a letter, digit, `-` or `_` (a dot inside a label, a space,
    /// non-ASCII) is escaped with a backslash, so such a name never equals a host name
    /// spelled in a policy.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The question type as on the wire: 1 for A, 28 for AAAA, 65 for HTTPS.
    pub fn qtype(&self) -> u16 {
        self.qtype
    }
}

impl fmt::Display for Query {
    /// `www.wikipedia.test AAAA`, the question as a log line shows it (the root as `.`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = if self.name.is_empty() {
            "."
        } else {
            &self.name
        };
        write!(f, "{name} {}", RecordType::from(self.qtype))
    }
}

/// Parses a workload's query: QR=0, opcode QUERY, exactly one question of class IN.
///
/// # Errors
/// The bytes do not decode, or break one of those conditions. There is then no question to
/// build a [`servfail`] for, so the query can only be dropped.
pub fn parse_query(bytes: &[u8]) -> Result<Query, MessageError> {
    let message = Message::from_vec(bytes).map_err(MessageError::Decode)?;
    if message.metadata.message_type != MessageType::Query {
        return Err(MessageError::NotAQuery);
    }
    check_opcode(&message)?;
    let question = single_question(&message)?;
    Ok(Query {
        id: message.metadata.id,
        name: normalise(&question.name),
        qtype: u16::from(question.query_type),
        question: question.clone(),
        recursion_desired: message.metadata.recursion_desired,
        checking_disabled: message.metadata.checking_disabled,
        edns_dnssec_ok: message.edns.as_ref().map(|edns| edns.flags().dnssec_ok),
    })
}

/// What a resolver's answer teaches about its query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The message id (the query's).
    pub id: u16,
    /// The response code as hickory-proto's `ResponseCode` converts it to `u16`, extended
    /// (EDNS) bits included: 0 NOERROR, 2 SERVFAIL, 3 NXDOMAIN, 5 REFUSED.
    pub rcode: u16,
    /// The question name, then each CNAME target followed from it, in order, normalised as
    /// [`Query::name`] is. Every name on it is one the workload will consider an alias of what
    /// it asked for, so the policy decision is taken on the whole chain.
    pub chain: Vec<String>,
    /// The A and AAAA records owned by the chain's last name, each with its TTL in seconds:
    /// the least of its own TTL and the TTL of every CNAME hop on the way, since the workload
    /// may use the address only as long as every link that led to it is cached. Empty unless
    /// `rcode` is NOERROR. Without duplicates (a repeated address keeps the lower TTL); an
    /// IPv4-mapped AAAA (`::ffff:192.0.2.1`) is given as the IPv4 address, because that is
    /// where the kernel's IPv6 hooks look it up.
    pub addrs: Vec<(IpAddr, u32)>,
    /// The TC bit: the resolver cut the answer, and the workload will ask again over TCP. What
    /// arrived may be a prefix of the records; when the cut answer does not even decode, only
    /// its header and question are read, and `chain` is the question name alone.
    pub truncated: bool,
}

/// Parses the resolver's answer to `query`, learning only what answers that query.
///
/// The answer must have QR=1, opcode QUERY, the query's id and the query's single question
/// (name compared case-insensitively, as resolvers may echo 0x20 case differently; same type
/// and class). CNAMEs in the answer section are followed from the question name (when an owner
/// has several, which RFC 1034 forbids, the first); records of another owner, another class,
/// or in the authority and additional sections are never read. A and AAAA records are taken
/// whatever the question type, as they are the only address records.
///
/// # Errors
/// The bytes do not decode (unless truncated, see [`Answer::truncated`]), the answer does not
/// match the query, or its CNAME chain loops or passes [`MAX_CNAME_HOPS`]. No error carries
/// anything learned: the agent answers the workload with [`servfail`].
pub fn parse_answer(bytes: &[u8], query: &Query) -> Result<Answer, MessageError> {
    let message = decode_answer(bytes)?;
    if message.metadata.message_type != MessageType::Response {
        return Err(MessageError::NotAResponse);
    }
    if message.metadata.id != query.id {
        return Err(MessageError::IdMismatch {
            expected: query.id,
            got: message.metadata.id,
        });
    }
    check_opcode(&message)?;
    let question = single_question(&message)?;
    // Name's `==` ignores ASCII case, as RFC 4343 wants for DNS names.
    if question.name != query.question.name
        || question.query_type != query.question.query_type
        || question.query_class != query.question.query_class
    {
        return Err(MessageError::QuestionMismatch {
            expected: describe(&query.question),
            got: describe(question),
        });
    }

    let (chain, hops_ttl) = follow_cnames(&message.answers, &question.name)?;
    let rcode = message.metadata.response_code;
    let mut addrs: Vec<(IpAddr, u32)> = Vec::new();
    if rcode == ResponseCode::NoError {
        let last = chain[chain.len() - 1];
        for record in in_class(&message.answers).filter(|r| r.name == *last) {
            let addr = match &record.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(aaaa) => canonical(aaaa.0),
                _ => continue,
            };
            let ttl = record.ttl.min(hops_ttl);
            match addrs.iter_mut().find(|(seen, _)| *seen == addr) {
                Some((_, seen_ttl)) => *seen_ttl = (*seen_ttl).min(ttl),
                None => addrs.push((addr, ttl)),
            }
        }
    }

    Ok(Answer {
        id: message.metadata.id,
        rcode: u16::from(rcode),
        chain: chain.into_iter().map(normalise).collect(),
        addrs,
        truncated: message.metadata.truncation,
    })
}

/// A SERVFAIL reply to `query`: same id and question (as sent, case included), RD and CD
/// copied, RA set, and an OPT record (DO bit copied) when the query had one.
///
/// The agent sends it when it cannot learn an answer's addresses: failing closed, the workload
/// must not receive an address the kernel will refuse, and SERVFAIL tells its stub to try
/// again later instead of caching a negative answer as NXDOMAIN would.
pub fn servfail(query: &Query) -> Vec<u8> {
    reply(
        query,
        Message::error_msg(query.id, OpCode::Query, ResponseCode::ServFail),
    )
    .to_vec()
    .expect("a header, one question decoded from the wire and an empty OPT always encode")
}

/// `message` made the reply to `query`: RD and CD copied, RA set, the question echoed, and an
/// OPT record (our payload size, DO copied) when the query had one.
fn reply(query: &Query, mut message: Message) -> Message {
    message.metadata.recursion_desired = query.recursion_desired;
    message.metadata.recursion_available = true;
    message.metadata.checking_disabled = query.checking_disabled;
    message.add_query(query.question.clone());
    if let Some(dnssec_ok) = query.edns_dnssec_ok {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD).set_dnssec_ok(dnssec_ok);
        message.set_edns(edns);
    }
    message
}

/// The agent's own answer to `query`: an A record with `v4` (TTL `ttl`) when it asks for A,
/// and NOERROR without records (NODATA) for any other type, so that a stub asking A and AAAA
/// takes the A. Same id and question, RD and CD copied, AA and RA set.
///
/// For the names of ExternalName aliases (`httpbin`, `httpbin.default.svc.cluster.local`):
/// the address only has to reach the kernel's redirect to the proxy, which picks the alias by
/// the request's Host.
pub fn synthesized(query: &Query, v4: Ipv4Addr, ttl: u32) -> Vec<u8> {
    let mut message = reply(query, Message::response(query.id, OpCode::Query));
    message.metadata.authoritative = true;
    if query.question.query_type == RecordType::A {
        message.add_answer(Record::from_rdata(
            query.question.name.clone(),
            ttl,
            RData::A(hickory_proto::rr::rdata::A(v4)),
        ));
    }
    message
        .to_vec()
        .expect("a header, one question decoded from the wire and an A record always encode")
}

/// The answer's bytes with every TTL of its answer section capped at `max_ttl` seconds.
///
/// The workload caches an answer for its TTL, but the kernel allows the addresses only as long
/// as the agent keeps them; capping the TTL at that time makes the workload ask again (and the
/// agent allow again) before its cached address would start being refused. The authority and
/// additional sections are left alone: nothing is learned from them. When no TTL is above
/// `max_ttl` the bytes are returned unchanged; otherwise the message is re-encoded by
/// hickory-proto, same records, compression possibly different.
///
/// # Errors
/// The bytes do not decode or the message does not encode again.
pub fn cap_ttls(bytes: &[u8], max_ttl: u32) -> Result<Vec<u8>, MessageError> {
    let mut message = Message::from_vec(bytes).map_err(MessageError::Decode)?;
    if message.answers.iter().all(|r| r.ttl <= max_ttl) {
        return Ok(bytes.to_vec());
    }
    for record in &mut message.answers {
        record.ttl = record.ttl.min(max_ttl);
    }
    message.to_vec().map_err(MessageError::Encode)
}

/// Decodes an answer; a truncated one that does not decode whole (a resolver cut it mid-record
/// but left the counts) is read as its header and questions only, so that the workload still
/// gets the TC bit and retries over TCP rather than getting SERVFAIL.
fn decode_answer(bytes: &[u8]) -> Result<Message, MessageError> {
    let whole = match Message::from_vec(bytes) {
        Ok(message) => return Ok(message),
        Err(e) => e,
    };
    let mut decoder = BinDecoder::new(bytes);
    let Ok(header) = Header::read(&mut decoder) else {
        return Err(MessageError::Decode(whole));
    };
    if !header.metadata.truncation {
        return Err(MessageError::Decode(whole));
    }
    let mut message = Message::new(
        header.metadata.id,
        header.metadata.message_type,
        header.metadata.op_code,
    );
    message.metadata = header.metadata;
    for _ in 0..header.counts.queries {
        let question =
            Question::read(&mut decoder).map_err(|_| MessageError::Decode(whole.clone()))?;
        message.add_query(question);
    }
    Ok(message)
}

/// Fails unless the opcode is QUERY.
fn check_opcode(message: &Message) -> Result<(), MessageError> {
    match message.metadata.op_code {
        OpCode::Query => Ok(()),
        other => Err(MessageError::OpCode(u8::from(other))),
    }
}

/// The message's only question, which must be of class IN.
fn single_question(message: &Message) -> Result<&Question, MessageError> {
    let [question] = message.queries.as_slice() else {
        return Err(MessageError::QuestionCount(message.queries.len()));
    };
    if question.query_class != DNSClass::IN {
        return Err(MessageError::Class(u16::from(question.query_class)));
    }
    Ok(question)
}

/// The names from `qname` along the CNAME records of `answers`, and the least TTL of the hops
/// taken (`u32::MAX` when there are none).
fn follow_cnames<'a>(
    answers: &'a [Record],
    qname: &'a Name,
) -> Result<(Vec<&'a Name>, u32), MessageError> {
    let mut chain = vec![qname];
    let mut ttl = u32::MAX;
    let mut current = qname;
    while let Some((target, hop_ttl)) = cname_of(answers, current) {
        if chain.contains(&target) {
            return Err(MessageError::CnameLoop {
                name: normalise(target),
            });
        }
        // `chain` holds the question name and one name per hop taken so far.
        if chain.len() > MAX_CNAME_HOPS {
            return Err(MessageError::CnameChainTooLong);
        }
        chain.push(target);
        ttl = ttl.min(hop_ttl);
        current = target;
    }
    Ok((chain, ttl))
}

/// The target and TTL of `owner`'s CNAME record in `answers`, the first if there are several.
fn cname_of<'a>(answers: &'a [Record], owner: &Name) -> Option<(&'a Name, u32)> {
    in_class(answers)
        .filter(|r| r.name == *owner)
        .find_map(|r| match &r.data {
            RData::CNAME(cname) => Some((&cname.0, r.ttl)),
            _ => None,
        })
}

/// The records of class IN: a CH or HS record says nothing about Internet addresses.
fn in_class(records: &[Record]) -> impl Iterator<Item = &Record> {
    records.iter().filter(|r| r.dns_class == DNSClass::IN)
}

/// An IPv4-mapped IPv6 address as the IPv4 address it maps, any other as is.
fn canonical(addr: Ipv6Addr) -> IpAddr {
    match addr.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(addr),
    }
}

/// A name as policies spell host names: ASCII lowercase, no trailing dot, the root as `""`.
fn normalise(name: &Name) -> String {
    let mut text = name.to_lowercase().to_ascii();
    // to_ascii ends a fully qualified name with the root's `.` (the root alone is ".").
    if name.is_fqdn() {
        text.pop();
    }
    text
}

/// `name TYPE` (class too when not IN), for an error message.
fn describe(question: &Question) -> String {
    let mut text = format!("{} {}", normalise(&question.name), question.query_type);
    if question.query_class != DNSClass::IN {
        text.push_str(&format!(" {}", question.query_class));
    }
    text
}

#[cfg(test)]
mod tests {

    use hickory_proto::rr::rdata::{A, AAAA, CNAME};

    use super::*;

    const ID: u16 = 0x1234;

    fn name(text: &str) -> Name {
        let mut name = Name::from_ascii(text).unwrap();
        name.set_fqdn(true);
        name
    }

    fn query_message(id: u16, qname: &str, qtype: RecordType) -> Message {
        let mut message = Message::new(id, MessageType::Query, OpCode::Query);
        message.metadata.recursion_desired = true;
        message.add_query(Question::query(name(qname), qtype));
        message
    }

    fn encode(message: &Message) -> Vec<u8> {
        message.to_vec().unwrap()
    }

    fn query(qname: &str, qtype: RecordType) -> Query {
        parse_query(&encode(&query_message(ID, qname, qtype))).unwrap()
    }

    /// A NOERROR response to `query`'s question, as sent (case included), without records.
    fn response(query: &Query) -> Message {
        let mut message = Message::response(query.id, OpCode::Query);
        message.metadata.recursion_desired = true;
        message.metadata.recursion_available = true;
        message.add_query(query.question.clone());
        message
    }

    fn a(owner: &str, ttl: u32, addr: [u8; 4]) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::from(addr))))
    }

    fn aaaa(owner: &str, ttl: u32, addr: &str) -> Record {
        let addr: Ipv6Addr = addr.parse().unwrap();
        Record::from_rdata(name(owner), ttl, RData::AAAA(AAAA(addr)))
    }

    fn cname(owner: &str, ttl: u32, target: &str) -> Record {
        Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
    }

    fn learn(message: &Message, query: &Query) -> Result<Answer, MessageError> {
        parse_answer(&encode(message), query)
    }

    fn v4(addr: [u8; 4]) -> IpAddr {
        IpAddr::from(addr)
    }

    fn v6(addr: &str) -> IpAddr {
        addr.parse().unwrap()
    }

    #[test]
    fn a_answer() {
        let q = query("www.wikipedia.test", RecordType::A);
        let mut m = response(&q);
        m.add_answer(a("www.wikipedia.test", 300, [192, 0, 2, 10]));
        let answer = learn(&m, &q).unwrap();
        assert_eq!(
            answer,
            Answer {
                id: ID,
                rcode: 0,
                chain: vec!["www.wikipedia.test".to_owned()],
                addrs: vec![(v4([192, 0, 2, 10]), 300)],
                truncated: false,
            }
        );
    }

    #[test]
    fn aaaa_answer() {
        let q = query("www.wikipedia.test", RecordType::AAAA);
        let mut m = response(&q);
        m.add_answer(aaaa("www.wikipedia.test", 60, "2001:db8::10"));
        let answer = learn(&m, &q).unwrap();
        assert_eq!(answer.addrs, vec![(v6("2001:db8::10"), 60)]);
    }

    #[test]
    fn ipv4_mapped_aaaa_is_given_as_ipv4() {
        let q = query("mapped.test", RecordType::AAAA);
        let mut m = response(&q);
        m.add_answer(aaaa("mapped.test", 60, "::ffff:192.0.2.33"));
        assert_eq!(
            learn(&m, &q).unwrap().addrs,
            vec![(v4([192, 0, 2, 33]), 60)]
        );
    }

    #[test]
    fn several_addresses_in_order_without_duplicates() {
        let q = query("pool.wikipedia.test", RecordType::A);
        let mut m = response(&q);
        m.add_answer(a("pool.wikipedia.test", 300, [192, 0, 2, 1]));
        m.add_answer(a("pool.wikipedia.test", 300, [198, 51, 100, 2]));
        m.add_answer(a("pool.wikipedia.test", 300, [203, 0, 113, 3]));
        // The same address again with a lower TTL: one entry, the lower TTL (RFC 2181 5.2).
        m.add_answer(a("pool.wikipedia.test", 100, [192, 0, 2, 1]));
        assert_eq!(
            learn(&m, &q).unwrap().addrs,
            vec![
                (v4([192, 0, 2, 1]), 100),
                (v4([198, 51, 100, 2]), 300),
                (v4([203, 0, 113, 3]), 300),
            ]
        );
    }

    #[test]
    fn cname_chain_of_three_hops_takes_the_least_ttl() {
        let q = query("www.wikipedia.test", RecordType::A);
        let mut m = response(&q);
        // Out of order on purpose: the chain is followed by owner, not by position.
        m.add_answer(a("edge.cdn.test", 600, [192, 0, 2, 20]));
        m.add_answer(a("edge.cdn.test", 20, [192, 0, 2, 21]));
        m.add_answer(cname("lb.cdn.test", 3600, "edge.cdn.test"));
        m.add_answer(cname("www.wikipedia.test", 300, "dyna.wikipedia.test"));
        m.add_answer(cname("dyna.wikipedia.test", 45, "lb.cdn.test"));
        let answer = learn(&m, &q).unwrap();
        assert_eq!(
            answer.chain,
            [
                "www.wikipedia.test",
                "dyna.wikipedia.test",
                "lb.cdn.test",
                "edge.cdn.test"
            ]
        );
        assert_eq!(
            answer.addrs,
            vec![(v4([192, 0, 2, 20]), 45), (v4([192, 0, 2, 21]), 20)]
        );
    }

    #[test]
    fn cname_loop_is_an_error() {
        let q = query("a.loop.test", RecordType::A);
        let mut m = response(&q);
        m.add_answer(cname("a.loop.test", 60, "b.loop.test"));
        m.add_answer(cname("b.loop.test", 60, "c.loop.test"));
        m.add_answer(cname("c.loop.test", 60, "A.Loop.test"));
        m.add_answer(a("c.loop.test", 60, [192, 0, 2, 1]));
        let err = learn(&m, &q).unwrap_err();
        assert!(
            matches!(&err, MessageError::CnameLoop { name } if name == "a.loop.test"),
            "{err:?}"
        );
        assert_eq!(err.to_string(), "cname loop at a.loop.test");

        let mut m = response(&q);
        m.add_answer(cname("a.loop.test", 60, "a.loop.test"));
        assert!(matches!(learn(&m, &q), Err(MessageError::CnameLoop { .. })));
    }

    /// A response to `q` (asking `h0.chain.test`) with CNAMEs h0 -> h1 -> ... -> h`hops` and an
    /// A record for h`hops`.
    fn chain_of(q: &Query, hops: usize) -> Message {
        let mut m = response(q);
        for i in 0..hops {
            m.add_answer(cname(
                &format!("h{i}.chain.test"),
                60,
                &format!("h{}.chain.test", i + 1),
            ));
        }
        m.add_answer(a(&format!("h{hops}.chain.test"), 60, [203, 0, 113, 9]));
        m
    }

    #[test]
    fn at_most_16_cname_hops() {
        let q = query("h0.chain.test", RecordType::A);
        let answer = learn(&chain_of(&q, MAX_CNAME_HOPS), &q).unwrap();
        assert_eq!(answer.chain.len(), MAX_CNAME_HOPS + 1);
        assert_eq!(answer.chain.last().unwrap(), "h16.chain.test");
        assert_eq!(answer.addrs, vec![(v4([203, 0, 113, 9]), 60)]);

        let err = learn(&chain_of(&q, MAX_CNAME_HOPS + 1), &q).unwrap_err();
        assert!(matches!(err, MessageError::CnameChainTooLong), "{err:?}");
        assert_eq!(err.to_string(), "cname chain longer than 16 hops");
    }

    #[test]
    fn records_off_the_chain_are_ignored() {
        let q = query("www.wikipedia.test", RecordType::A);
        let mut m = response(&q);
        m.add_answer(cname("www.wikipedia.test", 300, "edge.cdn.test"));
        m.add_answer(a("edge.cdn.test", 300, [192, 0, 2, 1]));
        // Another name in the answer section, the question name itself (not the chain's
        // last name), and A records in the authority and additional sections.
        m.add_answer(a("other.test", 300, [198, 51, 100, 66]));
        m.add_answer(a("www.wikipedia.test", 300, [198, 51, 100, 67]));
        m.add_authority(a("edge.cdn.test", 300, [198, 51, 100, 68]));
        m.add_additional(a("edge.cdn.test", 300, [198, 51, 100, 69]));
        m.add_additional(aaaa("edge.cdn.test", 300, "2001:db8::69"));
        let answer = learn(&m, &q).unwrap();
        assert_eq!(answer.chain, ["www.wikipedia.test", "edge.cdn.test"]);
        assert_eq!(answer.addrs, vec![(v4([192, 0, 2, 1]), 300)]);
    }

    #[test]
    fn records_of_another_class_are_ignored() {
        let q = query("www.wikipedia.test", RecordType::A);
        let mut m = response(&q);
        let mut chaos_cname = cname("www.wikipedia.test", 300, "chaos.test");
        chaos_cname.dns_class = DNSClass::CH;
        let mut chaos_a = a("www.wikipedia.test", 300, [198, 51, 100, 1]);
        chaos_a.dns_class = DNSClass::CH;
        m.add_answer(chaos_cname);
        m.add_answer(chaos_a);
        m.add_answer(a("www.wikipedia.test", 300, [192, 0, 2, 1]));
        let answer = learn(&m, &q).unwrap();
        assert_eq!(answer.chain, ["www.wikipedia.test"]);
        assert_eq!(answer.addrs, vec![(v4([192, 0, 2, 1]), 300)]);
    }

    #[test]
    fn wrong_id_is_an_error() {
        let q = query("www.wikipedia.test", RecordType::A);
        let mut m = response(&q);
        m.metadata.id = ID + 1;
        m.add_answer(a("www.wikipedia.test", 300, [192, 0, 2, 1]));
        let err = learn(&m, &q).unwrap_err();
        assert!(
            matches!(
                err,
                MessageError::IdMismatch {
                    expected: ID,
                    got: 0x1235
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "answer id 4661 does not match query id 4660"
        );
    }

    #[test]
    fn wrong_question_is_an_error() {
        let q = query("www.wikipedia.test", RecordType::A);

        let mut m = response(&q);
        m.queries[0].name = name("www.wikipedia-evil.test");
        m.add_answer(a("www.wikipedia-evil.test", 300, [198, 51, 100, 1]));
        let err = learn(&m, &q).unwrap_err();
        assert!(
            matches!(err, MessageError::QuestionMismatch { .. }),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "answer question www.wikipedia-evil.test A does not match the query's \
             www.wikipedia.test A"
        );

        let mut m = response(&q);
        m.queries[0].query_type = RecordType::AAAA;
        m.add_answer(aaaa("www.wikipedia.test", 300, "2001:db8::1"));
        assert!(matches!(
            learn(&m, &q),
            Err(MessageError::QuestionMismatch { .. })
        ));

        let mut m = response(&q);
        m.queries.clear();
        m.add_answer(a("www.wikipedia.test", 300, [192, 0, 2, 1]));
        assert!(matches!(learn(&m, &q), Err(MessageError::QuestionCount(0))));
    }

    #[test]
    fn a_query_is_not_an_answer() {
        let q = query("www.wikipedia.test", RecordType::A);
        let mut m = response(&q);
        m.metadata.message_type = MessageType::Query;
        m.add_answer(a("www.wikipedia.test", 300, [192, 0, 2, 1]));
        let err = learn(&m, &q).unwrap_err();
        assert!(matches!(err, MessageError::NotAResponse), "{err:?}");

        // The workload's own query bytes bounced back: same id, same question, still QR=0.
        let bounced = encode(&query_message(ID, "www.wikipedia.test", RecordType::A));
        assert!(matches!(
            parse_answer(&bounced, &q),
            Err(MessageError::NotAResponse)
        ));
    }

    #[test]
    fn an_answer_of_another_opcode_is_an_error() {
        let q = query("www.wikipedia.test", RecordType::A);
        let mut m = response(&q);
        m.metadata.op_code = OpCode::Notify;
        let err = learn(&m, &q).unwrap_err();
        assert!(matches!(err, MessageError::OpCode(4)), "{err:?}");
        assert_eq!(err.to_string(), "opcode NOTIFY is not QUERY");
    }

    #[test]
    fn queries_with_other_than_one_question_are_refused() {
        let mut m = query_message(ID, "www.wikipedia.test", RecordType::A);
        m.add_query(Question::query(name("other.test"), RecordType::A));
        let err = parse_query(&encode(&m)).unwrap_err();
        assert!(matches!(err, MessageError::QuestionCount(2)), "{err:?}");
        assert_eq!(err.to_string(), "2 questions, expected exactly one");

        let m = Message::new(ID, MessageType::Query, OpCode::Query);
        assert!(matches!(
            parse_query(&encode(&m)),
            Err(MessageError::QuestionCount(0))
        ));
    }

    #[test]
    fn queries_that_are_not_standard_in_queries_are_refused() {
        let mut m = query_message(ID, "www.wikipedia.test", RecordType::A);
        m.metadata.message_type = MessageType::Response;
        assert!(matches!(
            parse_query(&encode(&m)),
            Err(MessageError::NotAQuery)
        ));

        let mut m = query_message(ID, "www.wikipedia.test", RecordType::SOA);
        m.metadata.op_code = OpCode::Update;
        assert!(matches!(
            parse_query(&encode(&m)),
            Err(MessageError::OpCode(5))
        ));

        let mut m = query_message(ID, "version.bind", RecordType::TXT);
        m.queries[0].query_class = DNSClass::CH;
        let err = parse_query(&encode(&m)).unwrap_err();
        assert!(matches!(err, MessageError::Class(3)), "{err:?}");
        assert_eq!(err.to_string(), "question class CH is not IN");
    }

    #[test]
    fn query_fields() {
        let q = query("www.wikipedia.test", RecordType::HTTPS);
        assert_eq!(q.id(), ID);
        assert_eq!(q.name(), "www.wikipedia.test");
        assert_eq!(q.qtype(), 65);
        assert_eq!(q.to_string(), "www.wikipedia.test HTTPS");

        let root = query(".", RecordType::NS);
        assert_eq!(root.name(), "");
        assert_eq!(root.to_string(), ". NS");
    }

    #[test]
    fn odd_bytes_in_names_are_escaped() {
        // One label `a.b` (a dot inside it) is not the two labels `a` and `b`.
        let mut m = Message::new(ID, MessageType::Query, OpCode::Query);
        let odd = Name::from_labels([&b"a.b"[..], b"test"]).unwrap();
        m.add_query(Question::query(odd, RecordType::A));
        assert_eq!(parse_query(&encode(&m)).unwrap().name(), "a\\.b.test");
    }

    #[test]
    fn truncated_answer() {
        let q = query("big.wikipedia.test", RecordType::A);
        let mut m = response(&q);
        m.metadata.truncation = true;
        m.add_answer(a("big.wikipedia.test", 300, [192, 0, 2, 1]));
        let answer = learn(&m, &q).unwrap();
        assert!(answer.truncated);
        assert_eq!(answer.addrs, vec![(v4([192, 0, 2, 1]), 300)]);

        // Cut mid-record, the count still saying one more answer: header and question only.
        m.add_answer(a("big.wikipedia.test", 300, [192, 0, 2, 2]));
        let mut bytes = encode(&m);
        bytes.truncate(bytes.len() - 3);
        let answer = parse_answer(&bytes, &q).unwrap();
        assert!(answer.truncated);
        assert_eq!(answer.chain, ["big.wikipedia.test"]);
        assert_eq!(answer.addrs, []);

        // The same cut without the TC bit is malformed.
        m.metadata.truncation = false;
        let mut bytes = encode(&m);
        bytes.truncate(bytes.len() - 3);
        assert!(matches!(
            parse_answer(&bytes, &q),
            Err(MessageError::Decode(_))
        ));
    }

    #[test]
    fn nxdomain_has_an_rcode_and_no_addresses() {
        let q = query("gone.wikipedia.test", RecordType::A);
        let mut m = response(&q);
        m.metadata.response_code = ResponseCode::NXDomain;
        m.add_answer(cname("gone.wikipedia.test", 300, "gone.cdn.test"));
        let answer = learn(&m, &q).unwrap();
        assert_eq!(answer.rcode, u16::from(ResponseCode::NXDomain));
        assert_eq!(answer.rcode, 3);
        assert_eq!(answer.chain, ["gone.wikipedia.test", "gone.cdn.test"]);
        assert_eq!(answer.addrs, []);
    }

    #[test]
    fn addresses_in_an_error_answer_are_not_learned() {
        let q = query("www.wikipedia.test", RecordType::A);
        let mut m = response(&q);
        m.metadata.response_code = ResponseCode::ServFail;
        m.add_answer(a("www.wikipedia.test", 300, [192, 0, 2, 1]));
        let answer = learn(&m, &q).unwrap();
        assert_eq!(answer.rcode, 2);
        assert_eq!(answer.addrs, []);
    }

    #[test]
    fn mixed_case_names_are_normalised() {
        let q = query("WWW.Wikipedia.TEST", RecordType::A);
        assert_eq!(q.name(), "www.wikipedia.test");
        let mut m = response(&q);
        // The resolver echoes the question in other case (0x20) and the records mix case.
        m.queries[0].name = name("wWw.wIkIpEdIa.TeSt");
        m.add_answer(cname("www.WIKIPEDIA.test", 300, "Edge.CDN.Test"));
        m.add_answer(a("EDGE.cdn.test", 300, [192, 0, 2, 7]));
        let answer = learn(&m, &q).unwrap();
        assert_eq!(answer.chain, ["www.wikipedia.test", "edge.cdn.test"]);
        assert_eq!(answer.addrs, vec![(v4([192, 0, 2, 7]), 300)]);
    }

    #[test]
    fn garbage_is_an_error() {
        let q = query("www.wikipedia.test", RecordType::A);
        for bytes in [
            &b""[..],
            b"\x12",
            b"\x12\x34\x81\x80",
            b"not a dns message at all, just text",
            &[0xff; 64],
        ] {
            assert!(
                matches!(parse_query(bytes), Err(MessageError::Decode(_))),
                "{bytes:?}"
            );
            assert!(
                matches!(parse_answer(bytes, &q), Err(MessageError::Decode(_))),
                "{bytes:?}"
            );
        }
        assert_eq!(
            parse_query(b"").unwrap_err().to_string(),
            "malformed dns message"
        );
    }

    #[test]
    fn a_synthesized_answer_has_an_a_record_for_a_and_nothing_for_aaaa() {
        let v4 = Ipv4Addr::new(240, 240, 0, 1);
        let query = query("HttpBin", RecordType::A);
        let answer = parse_answer(&synthesized(&query, v4, 30), &query).expect("answer");
        assert_eq!(answer.rcode, 0);
        assert_eq!(answer.chain, ["httpbin"]);
        assert_eq!(answer.addrs, [(IpAddr::V4(v4), 30)]);
        let query = self::query("httpbin", RecordType::AAAA);
        let answer = parse_answer(&synthesized(&query, v4, 30), &query).expect("answer");
        assert_eq!((answer.rcode, answer.addrs.len()), (0, 0));
    }

    #[test]
    fn servfail_round_trips() {
        let mut m = query_message(ID, "WwW.wikipedia.test", RecordType::AAAA);
        m.metadata.checking_disabled = true;
        let mut edns = Edns::new();
        edns.set_max_payload(4096).set_dnssec_ok(true);
        m.set_edns(edns);
        let q = parse_query(&encode(&m)).unwrap();

        let bytes = servfail(&q);
        let answer = parse_answer(&bytes, &q).unwrap();
        assert_eq!(answer.rcode, u16::from(ResponseCode::ServFail));
        assert_eq!(answer.chain, ["www.wikipedia.test"]);
        assert_eq!(answer.addrs, []);
        assert!(!answer.truncated);

        let reply = Message::from_vec(&bytes).unwrap();
        assert_eq!(reply.metadata.id, ID);
        assert!(reply.metadata.recursion_desired);
        assert!(reply.metadata.recursion_available);
        assert!(reply.metadata.checking_disabled);
        assert!(reply.answers.is_empty());
        // The question exactly as sent, case included, for stubs that check 0x20 case.
        assert!(reply.queries[0].name.eq_case(&name("WwW.wikipedia.test")));
        let edns = reply.edns.expect("an OPT record, as the query had one");
        assert!(edns.flags().dnssec_ok);
        assert_eq!(edns.max_payload(), EDNS_PAYLOAD);
    }

    #[test]
    fn servfail_copies_rd_and_adds_no_opt_to_a_plain_query() {
        let mut m = query_message(ID, "www.wikipedia.test", RecordType::A);
        m.metadata.recursion_desired = false;
        let q = parse_query(&encode(&m)).unwrap();
        let reply = Message::from_vec(&servfail(&q)).unwrap();
        assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
        assert!(!reply.metadata.recursion_desired);
        assert!(reply.edns.is_none());
    }

    #[test]
    fn cap_ttls_caps_the_answer_section_only() {
        let q = query("WWW.wikipedia.test", RecordType::A);
        let mut m = response(&q);
        m.add_answer(cname("www.wikipedia.test", 3600, "edge.cdn.test"));
        m.add_answer(a("edge.cdn.test", 30, [192, 0, 2, 1]));
        m.add_answer(a("edge.cdn.test", 86400, [192, 0, 2, 2]));
        m.add_additional(a("ns.cdn.test", 86400, [192, 0, 2, 53]));
        let bytes = encode(&m);

        let capped = cap_ttls(&bytes, 300).unwrap();
        let reread = Message::from_vec(&capped).unwrap();
        let ttls: Vec<u32> = reread.answers.iter().map(|r| r.ttl).collect();
        assert_eq!(ttls, [300, 30, 300]);
        assert_eq!(reread.additionals[0].ttl, 86400);
        assert!(reread.queries[0].name.eq_case(&name("WWW.wikipedia.test")));
        assert_eq!(
            parse_answer(&capped, &q).unwrap().addrs,
            vec![(v4([192, 0, 2, 1]), 30), (v4([192, 0, 2, 2]), 300)]
        );

        // Nothing above the cap: the very same bytes.
        assert_eq!(cap_ttls(&bytes, 86400).unwrap(), bytes);
        assert!(matches!(
            cap_ttls(b"\x00", 300),
            Err(MessageError::Decode(_))
        ));
    }
}
