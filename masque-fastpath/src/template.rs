//! The CONNECT-UDP and CONNECT-IP URI templates (RFC 9298 §2, RFC 9484 §4.6). Not written yet.
