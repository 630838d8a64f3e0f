//! Handshake messages (proto.md, "Fixed newstyle negotiation" and "Option
//! types"): the server's greeting, the client's flags, option requests and
//! the server's option replies.

use super::wire::{
    ClientFlags, HandshakeFlags, IHAVEOPT, InfoType, NBD_MAGIC, OPTION_REPLY_MAGIC, OptionCode,
    OptionReplyType, TransmissionFlags,
};
use super::{MAX_STRING_LEN, ProtoError, Reader};

/// The handshake flags this server offers: fixed newstyle, and no 124
/// zero bytes after `NBD_OPT_EXPORT_NAME` for clients that agree.
pub const SERVER_FLAGS: HandshakeFlags =
    HandshakeFlags(HandshakeFlags::FIXED_NEWSTYLE.0 | HandshakeFlags::NO_ZEROES.0);

/// The client flags a client may answer with: those matching
/// [`SERVER_FLAGS`]. "The server MUST drop the TCP connection if the client
/// sets an unknown flag, or a flag that does not match something advertised
/// by the server."
const KNOWN_CLIENT_FLAGS: ClientFlags =
    ClientFlags(ClientFlags::FIXED_NEWSTYLE.0 | ClientFlags::NO_ZEROES.0);

/// The most option data this server reads. The longest valid options are
/// `NBD_OPT_INFO`/`GO` and the meta context options, whose strings are at
/// most 4096 bytes each; 64 KiB leaves room for an export name and a dozen
/// maximal queries, and keeps what a client can make the server allocate
/// small. Longer options are refused without being read.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Length of the zero padding after an `NBD_OPT_EXPORT_NAME` reply, unless
/// the client negotiated `NBD_FLAG_C_NO_ZEROES`.
const EXPORT_NAME_ZEROES: usize = 124;

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(out: &mut Vec<u8>) {
    out.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&SERVER_FLAGS.0.to_be_bytes());
}

/// Reads the client's 32-bit flags, refusing any bit the server did not
/// offer.
pub fn read_client_flags(bytes: &[u8]) -> Result<ClientFlags, ProtoError> {
    let mut r = Reader::new(bytes);
    let flags = ClientFlags(r.u32()?);
    r.finish()?;
    let unknown = flags.outside(KNOWN_CLIENT_FLAGS);
    if !unknown.is_empty() {
        return Err(ProtoError::UnknownClientFlags(flags.0));
    }
    Ok(flags)
}

/// The fixed part of every option: magic, option code, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub code: OptionCode,
    pub length: u32,
}

impl OptionHeader {
    pub const LEN: usize = 16;

    /// Reads a header; a length over [`MAX_OPTION_LEN`] is refused here, so
    /// the caller never allocates for it.
    pub fn read(bytes: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(bytes);
        let magic = r.u64()?;
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic {
                expected: IHAVEOPT,
                found: magic,
            });
        }
        let header = OptionHeader {
            code: OptionCode(r.u32()?),
            length: r.u32()?,
        };
        r.finish()?;
        if header.length > MAX_OPTION_LEN {
            return Err(ProtoError::OptionTooLarge {
                length: header.length,
                max: MAX_OPTION_LEN,
            });
        }
        Ok(header)
    }
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    pub name: String,
    /// In the client's order; unknown types are kept (the server ignores
    /// them, as it must).
    pub info_requests: Vec<InfoType>,
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<MetaContextQuery>,
}

/// One metadata context query: a namespace, a colon, a leaf name (which may
/// be empty: `base:` is the wildcard query of the `base` namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextQuery {
    pub namespace: String,
    pub leaf: String,
}

/// An option the client sent, with its data parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(ExportRequest),
    Go(ExportRequest),
    StructuredReply,
    ListMetaContext(MetaContextRequest),
    SetMetaContext(MetaContextRequest),
    /// Any other option: known to the protocol but not to this server, or
    /// unknown altogether. Answered with `NBD_REP_ERR_UNSUP`.
    Unsupported(OptionCode),
}

impl ClientOption {
    /// Parses the data of the option `code`. Errors are syntax errors of
    /// an option this server knows: the caller answers them with
    /// `NBD_REP_ERR_INVALID` (or, for `NBD_OPT_EXPORT_NAME`, which cannot
    /// be answered with an error, ends the session).
    pub fn read(code: OptionCode, data: &[u8]) -> Result<Self, ProtoError> {
        let mut r = Reader::new(data);
        let option = match code {
            OptionCode::EXPORT_NAME => ClientOption::ExportName(r.string(data.len())?),
            OptionCode::ABORT => {
                // "a server SHOULD ignore any data sent by the client".
                return Ok(ClientOption::Abort);
            }
            OptionCode::LIST => ClientOption::List,
            OptionCode::STARTTLS => ClientOption::StartTls,
            OptionCode::INFO => ClientOption::Info(read_export_request(&mut r)?),
            OptionCode::GO => ClientOption::Go(read_export_request(&mut r)?),
            OptionCode::STRUCTURED_REPLY => ClientOption::StructuredReply,
            OptionCode::LIST_META_CONTEXT => {
                ClientOption::ListMetaContext(read_meta_context_request(&mut r)?)
            }
            OptionCode::SET_META_CONTEXT => {
                ClientOption::SetMetaContext(read_meta_context_request(&mut r)?)
            }
            other => return Ok(ClientOption::Unsupported(other)),
        };
        r.finish()?;
        Ok(option)
    }
}

fn read_export_request(r: &mut Reader<'_>) -> Result<ExportRequest, ProtoError> {
    let name_len = r.u32()? as usize;
    let name = r.string(name_len)?;
    let count = r.u16()?;
    // Not `with_capacity(count)`: the count is the client's word; the data
    // behind it is what bounds the loop.
    let mut info_requests = Vec::new();
    for _ in 0..count {
        info_requests.push(InfoType(r.u16()?));
    }
    Ok(ExportRequest {
        name,
        info_requests,
    })
}

fn read_meta_context_request(r: &mut Reader<'_>) -> Result<MetaContextRequest, ProtoError> {
    let export_len = r.u32()? as usize;
    let export = r.string(export_len)?;
    let count = r.u32()?;
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = r.u32()? as usize;
        let query = r.string(len)?;
        queries.push(parse_query(query)?);
    }
    Ok(MetaContextRequest { export, queries })
}

/// "The syntax of this query is implementation-defined, except that it MUST
/// start with a namespace and a colon"; a namespace is non-empty.
fn parse_query(query: String) -> Result<MetaContextQuery, ProtoError> {
    match query.split_once(':') {
        Some((namespace, leaf)) if !namespace.is_empty() => Ok(MetaContextQuery {
            namespace: namespace.to_owned(),
            leaf: leaf.to_owned(),
        }),
        _ => Err(ProtoError::QueryWithoutNamespace(query)),
    }
}

/// One piece of information about an export, sent in an `NBD_REP_INFO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info<'a> {
    Export {
        size: u64,
        flags: TransmissionFlags,
    },
    Name(&'a str),
    Description(&'a str),
    BlockSize {
        minimum: u32,
        preferred: u32,
        maximum: u32,
    },
}

/// A reply to an option (every option but `NBD_OPT_EXPORT_NAME`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionReply<'a> {
    Ack,
    /// One export, in reply to `NBD_OPT_LIST`.
    Server {
        name: &'a str,
        description: &'a str,
    },
    Info(Info<'a>),
    MetaContext {
        id: u32,
        name: &'a str,
    },
    /// An error reply; `kind` must have bit 31 set. The message is for a
    /// human and is cut to the protocol's string limit.
    Error {
        kind: OptionReplyType,
        message: &'a str,
    },
}

impl OptionReply<'_> {
    /// Appends the reply to `option` to `out`.
    pub fn encode(&self, option: OptionCode, out: &mut Vec<u8>) {
        out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&option.0.to_be_bytes());
        let kind = match self {
            OptionReply::Ack => OptionReplyType::ACK,
            OptionReply::Server { .. } => OptionReplyType::SERVER,
            OptionReply::Info(_) => OptionReplyType::INFO,
            OptionReply::MetaContext { .. } => OptionReplyType::META_CONTEXT,
            OptionReply::Error { kind, .. } => *kind,
        };
        out.extend_from_slice(&kind.0.to_be_bytes());
        let length_at = out.len();
        out.extend_from_slice(&[0; 4]);
        match *self {
            OptionReply::Ack => {}
            OptionReply::Server { name, description } => {
                put_sized_string(out, name);
                out.extend_from_slice(truncate(description).as_bytes());
            }
            OptionReply::Info(info) => info.encode(out),
            OptionReply::MetaContext { id, name } => {
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(truncate(name).as_bytes());
            }
            OptionReply::Error { message, .. } => {
                out.extend_from_slice(truncate(message).as_bytes());
            }
        }
        let length = (out.len() - length_at - 4) as u32;
        out[length_at..length_at + 4].copy_from_slice(&length.to_be_bytes());
    }
}

impl Info<'_> {
    fn encode(&self, out: &mut Vec<u8>) {
        match *self {
            Info::Export { size, flags } => {
                out.extend_from_slice(&InfoType::EXPORT.0.to_be_bytes());
                out.extend_from_slice(&size.to_be_bytes());
                out.extend_from_slice(&flags.0.to_be_bytes());
            }
            Info::Name(name) => {
                out.extend_from_slice(&InfoType::NAME.0.to_be_bytes());
                out.extend_from_slice(truncate(name).as_bytes());
            }
            Info::Description(description) => {
                out.extend_from_slice(&InfoType::DESCRIPTION.0.to_be_bytes());
                out.extend_from_slice(truncate(description).as_bytes());
            }
            Info::BlockSize {
                minimum,
                preferred,
                maximum,
            } => {
                out.extend_from_slice(&InfoType::BLOCK_SIZE.0.to_be_bytes());
                out.extend_from_slice(&minimum.to_be_bytes());
                out.extend_from_slice(&preferred.to_be_bytes());
                out.extend_from_slice(&maximum.to_be_bytes());
            }
        }
    }
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and 124
/// zero bytes unless the client negotiated `NBD_FLAG_C_NO_ZEROES`.
pub fn encode_export_name_reply(
    size: u64,
    flags: TransmissionFlags,
    no_zeroes: bool,
    out: &mut Vec<u8>,
) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.0.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0; EXPORT_NAME_ZEROES]);
    }
}

fn put_sized_string(out: &mut Vec<u8>, s: &str) {
    let s = truncate(s);
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Cuts a string to the protocol's limit, on a character boundary.
pub(crate) fn truncate(s: &str) -> &str {
    if s.len() <= MAX_STRING_LEN {
        return s;
    }
    let mut end = MAX_STRING_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn export_request(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for info in infos {
            data.extend_from_slice(&info.to_be_bytes());
        }
        data
    }

    pub(crate) fn meta_request(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            data.extend_from_slice(&(q.len() as u32).to_be_bytes());
            data.extend_from_slice(q.as_bytes());
        }
        data
    }

    #[test]
    fn greeting_is_magic_magic_flags() {
        let mut out = Vec::new();
        encode_greeting(&mut out);
        assert_eq!(&out[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(&out[16..], &[0, 3]);
    }

    #[test]
    fn client_flags_outside_what_was_offered_are_refused() {
        assert_eq!(read_client_flags(&[0, 0, 0, 3]), Ok(ClientFlags(3)));
        assert_eq!(read_client_flags(&[0, 0, 0, 0]), Ok(ClientFlags(0)));
        assert_eq!(
            read_client_flags(&[0, 0, 0, 4]),
            Err(ProtoError::UnknownClientFlags(4))
        );
        assert_eq!(
            read_client_flags(&[0x80, 0, 0, 1]),
            Err(ProtoError::UnknownClientFlags(0x8000_0001))
        );
        assert_eq!(
            read_client_flags(&[0, 0, 1]),
            Err(ProtoError::Truncated { needed: 1 })
        );
    }

    #[test]
    fn option_header_checks_magic_and_length_before_any_data() {
        let mut h = IHAVEOPT.to_be_bytes().to_vec();
        h.extend_from_slice(&7u32.to_be_bytes());
        h.extend_from_slice(&10u32.to_be_bytes());
        assert_eq!(
            OptionHeader::read(&h),
            Ok(OptionHeader {
                code: OptionCode::GO,
                length: 10
            })
        );

        let mut bad = h.clone();
        bad[0] = b'X';
        assert!(matches!(
            OptionHeader::read(&bad),
            Err(ProtoError::BadMagic { .. })
        ));

        let mut huge = h.clone();
        huge[12..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            OptionHeader::read(&huge),
            Err(ProtoError::OptionTooLarge {
                length: u32::MAX,
                max: MAX_OPTION_LEN
            })
        );
        let mut limit = h.clone();
        limit[12..].copy_from_slice(&MAX_OPTION_LEN.to_be_bytes());
        assert!(OptionHeader::read(&limit).is_ok());

        assert_eq!(
            OptionHeader::read(&h[..15]),
            Err(ProtoError::Truncated { needed: 1 })
        );
    }

    #[test]
    fn options_without_data_refuse_data_except_abort() {
        for code in [
            OptionCode::LIST,
            OptionCode::STARTTLS,
            OptionCode::STRUCTURED_REPLY,
        ] {
            assert!(ClientOption::read(code, &[]).is_ok());
            assert_eq!(
                ClientOption::read(code, &[1, 2]),
                Err(ProtoError::TrailingBytes(2))
            );
        }
        assert_eq!(
            ClientOption::read(OptionCode::ABORT, &[1, 2, 3]),
            Ok(ClientOption::Abort)
        );
    }

    #[test]
    fn export_name_is_the_whole_data() {
        assert_eq!(
            ClientOption::read(OptionCode::EXPORT_NAME, b"vol-1"),
            Ok(ClientOption::ExportName("vol-1".into()))
        );
        assert_eq!(
            ClientOption::read(OptionCode::EXPORT_NAME, b""),
            Ok(ClientOption::ExportName(String::new()))
        );
        assert_eq!(
            ClientOption::read(OptionCode::EXPORT_NAME, &[0xc3]),
            Err(ProtoError::InvalidUtf8)
        );
    }

    #[test]
    fn info_and_go_parse_name_and_info_requests() {
        let data = export_request("disk", &[3, 1, 0x7777]);
        let expected = ExportRequest {
            name: "disk".into(),
            info_requests: vec![InfoType::BLOCK_SIZE, InfoType::NAME, InfoType(0x7777)],
        };
        assert_eq!(
            ClientOption::read(OptionCode::GO, &data),
            Ok(ClientOption::Go(expected.clone()))
        );
        assert_eq!(
            ClientOption::read(OptionCode::INFO, &data),
            Ok(ClientOption::Info(expected))
        );
    }

    #[test]
    fn info_and_go_malformed() {
        // Name length past the data.
        let mut data = export_request("disk", &[]);
        data[3] = 200;
        assert!(matches!(
            ClientOption::read(OptionCode::GO, &data),
            Err(ProtoError::Truncated { .. })
        ));
        // Count of info requests larger than the data carries.
        let mut data = export_request("disk", &[1]);
        let count_at = 4 + 4;
        data[count_at..count_at + 2].copy_from_slice(&u16::MAX.to_be_bytes());
        assert!(matches!(
            ClientOption::read(OptionCode::GO, &data),
            Err(ProtoError::Truncated { .. })
        ));
        // Trailing byte.
        let mut data = export_request("disk", &[1]);
        data.push(0);
        assert_eq!(
            ClientOption::read(OptionCode::INFO, &data),
            Err(ProtoError::TrailingBytes(1))
        );
        // No count at all.
        assert!(matches!(
            ClientOption::read(OptionCode::GO, &[0, 0, 0, 0]),
            Err(ProtoError::Truncated { needed: 2 })
        ));
    }

    #[test]
    fn meta_context_queries_need_a_namespace() {
        let data = meta_request("disk", &["base:allocation", "base:", "qemu:dirty-bitmap:x"]);
        let ClientOption::SetMetaContext(req) =
            ClientOption::read(OptionCode::SET_META_CONTEXT, &data).unwrap()
        else {
            panic!("wrong option");
        };
        assert_eq!(req.export, "disk");
        assert_eq!(
            req.queries,
            vec![
                MetaContextQuery {
                    namespace: "base".into(),
                    leaf: "allocation".into()
                },
                MetaContextQuery {
                    namespace: "base".into(),
                    leaf: String::new()
                },
                MetaContextQuery {
                    namespace: "qemu".into(),
                    leaf: "dirty-bitmap:x".into()
                },
            ]
        );
        for bad in ["allocation", ":allocation"] {
            assert_eq!(
                ClientOption::read(OptionCode::LIST_META_CONTEXT, &meta_request("", &[bad])),
                Err(ProtoError::QueryWithoutNamespace(bad.into()))
            );
        }
        // A query count the data cannot hold.
        let mut data = meta_request("", &[]);
        data[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            ClientOption::read(OptionCode::LIST_META_CONTEXT, &data),
            Err(ProtoError::Truncated { .. })
        ));
        // A query length past the data.
        let mut data = meta_request("", &["base:allocation"]);
        data[8..12].copy_from_slice(&100u32.to_be_bytes());
        assert!(matches!(
            ClientOption::read(OptionCode::SET_META_CONTEXT, &data),
            Err(ProtoError::Truncated { .. })
        ));
    }

    #[test]
    fn unknown_options_are_kept_by_number() {
        assert_eq!(
            ClientOption::read(OptionCode(0xdead), &[1, 2, 3]),
            Ok(ClientOption::Unsupported(OptionCode(0xdead)))
        );
        assert_eq!(
            ClientOption::read(OptionCode::EXTENDED_HEADERS, &[]),
            Ok(ClientOption::Unsupported(OptionCode::EXTENDED_HEADERS))
        );
    }

    #[test]
    fn option_replies_encode_header_and_data() {
        let mut out = Vec::new();
        OptionReply::Ack.encode(OptionCode::GO, &mut out);
        assert_eq!(
            out,
            [
                &OPTION_REPLY_MAGIC.to_be_bytes()[..],
                &[0, 0, 0, 7],
                &[0, 0, 0, 1],
                &[0, 0, 0, 0]
            ]
            .concat()
        );

        out.clear();
        OptionReply::Info(Info::Export {
            size: 0x1_0000_0000,
            flags: TransmissionFlags(0x0d0d),
        })
        .encode(OptionCode::INFO, &mut out);
        assert_eq!(&out[12..16], &[0, 0, 0, 3]);
        assert_eq!(&out[16..20], &[0, 0, 0, 12]);
        assert_eq!(&out[20..], &[0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0x0d, 0x0d]);

        out.clear();
        OptionReply::Info(Info::BlockSize {
            minimum: 1,
            preferred: 4096,
            maximum: 1 << 25,
        })
        .encode(OptionCode::GO, &mut out);
        assert_eq!(&out[16..20], &[0, 0, 0, 14]);
        assert_eq!(&out[20..], &[0, 3, 0, 0, 0, 1, 0, 0, 16, 0, 2, 0, 0, 0]);

        out.clear();
        OptionReply::Server {
            name: "a",
            description: "bc",
        }
        .encode(OptionCode::LIST, &mut out);
        assert_eq!(&out[16..], &[0, 0, 0, 7, 0, 0, 0, 1, b'a', b'b', b'c']);

        out.clear();
        OptionReply::MetaContext {
            id: 9,
            name: "base:allocation",
        }
        .encode(OptionCode::SET_META_CONTEXT, &mut out);
        assert_eq!(&out[16..20], &19u32.to_be_bytes());
        assert_eq!(&out[20..24], &9u32.to_be_bytes());
        assert_eq!(&out[24..], b"base:allocation");

        out.clear();
        let long = "é".repeat(3000);
        OptionReply::Error {
            kind: OptionReplyType::ERR_INVALID,
            message: &long,
        }
        .encode(OptionCode::LIST, &mut out);
        assert_eq!(&out[12..16], &OptionReplyType::ERR_INVALID.0.to_be_bytes());
        assert_eq!(&out[16..20], &4096u32.to_be_bytes());
        assert!(std::str::from_utf8(&out[20..]).is_ok());
    }

    #[test]
    fn export_name_reply_pads_unless_no_zeroes() {
        let mut out = Vec::new();
        encode_export_name_reply(512, TransmissionFlags(1), false, &mut out);
        assert_eq!(out.len(), 8 + 2 + 124);
        out.clear();
        encode_export_name_reply(512, TransmissionFlags(1), true, &mut out);
        assert_eq!(out, [0, 0, 0, 0, 0, 0, 2, 0, 0, 1]);
    }

    proptest! {
        #[test]
        fn option_parsing_never_panics(code in 0u32..16, data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = ClientOption::read(OptionCode(code), &data);
        }

        #[test]
        fn option_headers_are_read_only_when_exactly_well_formed(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            let result = OptionHeader::read(&bytes);
            let well_formed = bytes.len() == OptionHeader::LEN
                && bytes[..8] == IHAVEOPT.to_be_bytes()
                && u32::from_be_bytes(bytes[12..16].try_into().unwrap()) <= MAX_OPTION_LEN;
            prop_assert_eq!(result.is_ok(), well_formed);
        }

        #[test]
        fn well_formed_go_round_trips(name in "[a-z0-9-]{0,40}", infos in proptest::collection::vec(any::<u16>(), 0..8)) {
            let data = export_request(&name, &infos);
            let parsed = ClientOption::read(OptionCode::GO, &data).unwrap();
            prop_assert_eq!(parsed, ClientOption::Go(ExportRequest {
                name,
                info_requests: infos.into_iter().map(InfoType).collect(),
            }));
        }
    }
}
