//! Compiles a validated [`Policy`](crate::policy::Policy) into map entries.
