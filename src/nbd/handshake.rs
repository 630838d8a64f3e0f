//! The fixed-newstyle negotiation (proto.md, "Handshake" and "Option
//! types"), from the greeting to the transmission phase, one method per
//! option. The I/O loop is thin: it reads one whole option and hands it to
//! [`Negotiation::option`], which decides and encodes the replies without
//! touching the socket.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info};

use super::proto::ProtoError;
use super::proto::handshake::{
    ClientOption, ExportRequest, Info, MetaContextQuery, MetaContextRequest, OptionHeader,
    OptionReply, encode_export_name_reply, encode_greeting, read_client_flags,
};
use super::proto::wire::{ClientFlags, InfoType, OptionCode, OptionReplyType, TransmissionFlags};
use super::{Export, Limits};

/// The one metadata context this server knows.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Its id in replies to `NBD_OPT_SET_META_CONTEXT` and in block status
/// chunks. Any value will do: ids are opaque to clients.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What the transmission phase needs to know about the negotiation.
#[derive(Debug, Clone)]
pub struct Session {
    pub export: Export,
    /// The size sent to the client; requests are checked against it.
    pub size: u64,
    /// The transmission flags sent to the client.
    pub flags: TransmissionFlags,
    /// Whether the client negotiated `NBD_OPT_STRUCTURED_REPLY`.
    pub structured: bool,
    /// The id of `base:allocation`, when the client selected it for this
    /// export.
    pub meta_context: Option<u32>,
    /// The maximum payload advertised in `NBD_INFO_BLOCK_SIZE`.
    pub max_request_bytes: u32,
}

impl Session {
    pub fn new(
        export: &Export,
        structured: bool,
        meta_context: Option<u32>,
        limits: &Limits,
    ) -> Self {
        Session {
            export: export.clone(),
            size: export.backend.size(),
            flags: transmission_flags(export, structured),
            structured,
            meta_context,
            max_request_bytes: limits.max_request_bytes,
        }
    }
}

/// The transmission flags of `export` on a connection that did (or did
/// not) negotiate structured replies.
pub fn transmission_flags(export: &Export, structured: bool) -> TransmissionFlags {
    // FLUSH and FUA reach the backend, which every connection shares, so
    // their effect is visible to all connections: that is the promise of
    // CAN_MULTI_CONN. CACHE is always accepted (a hint).
    let mut flags = TransmissionFlags::HAS_FLAGS
        | TransmissionFlags::SEND_FLUSH
        | TransmissionFlags::SEND_CACHE
        | TransmissionFlags::CAN_MULTI_CONN;
    if export.read_only {
        flags |= TransmissionFlags::READ_ONLY;
    } else {
        flags |= TransmissionFlags::SEND_FUA
            | TransmissionFlags::SEND_WRITE_ZEROES
            | TransmissionFlags::SEND_FAST_ZERO;
        if export.backend.can_trim() {
            flags |= TransmissionFlags::SEND_TRIM;
        }
    }
    // Every read is answered with a single data chunk, so "don't
    // fragment" holds by construction; it needs structured replies.
    if structured {
        flags |= TransmissionFlags::SEND_DF;
    }
    flags
}

/// How a negotiation ended without an error.
#[derive(Debug)]
pub enum Negotiated {
    /// Enter the transmission phase.
    Transmission(Session),
    /// The client sent `NBD_OPT_ABORT`.
    Aborted,
    /// The client closed the connection between messages.
    Closed,
}

/// Why a negotiation ended the session.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("connection failed during the handshake: {0}")]
    Io(#[from] io::Error),
    /// A malformed greeting answer or option header, after which the
    /// stream cannot be trusted: proto.md allows a hard disconnect.
    #[error("client sent a malformed handshake message: {0}")]
    Protocol(#[from] ProtoError),
    /// `NBD_OPT_EXPORT_NAME` cannot be answered with an error: "the server
    /// MUST terminate the session".
    #[error("client asked for export {0:?} with NBD_OPT_EXPORT_NAME, and there is none; closing")]
    UnknownExport(String),
}

/// Runs the negotiation: greeting, client flags, then options until the
/// client enters transmission, aborts, or leaves.
pub async fn negotiate<R, W>(
    reader: &mut R,
    writer: &mut W,
    exports: &[Export],
    limits: &Limits,
) -> Result<Negotiated, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(512);
    encode_greeting(&mut out);
    writer.write_all(&out).await?;
    writer.flush().await?;

    let mut flags = [0; 4];
    if !read_message(reader, &mut flags).await? {
        return Ok(Negotiated::Closed);
    }
    let client_flags = read_client_flags(&flags)?;
    debug!(flags = ?client_flags, "client flags");
    let mut negotiation = Negotiation::new(exports, limits, client_flags);

    loop {
        let mut header = [0; OptionHeader::LEN];
        if !read_message(reader, &mut header).await? {
            return Ok(Negotiated::Closed);
        }
        let header = OptionHeader::read(&header)?;
        let mut data = vec![0; header.length as usize];
        reader.read_exact(&mut data).await?;
        out.clear();
        let step = negotiation.option(header.code, &data, &mut out)?;
        let written = async {
            writer.write_all(&out).await?;
            writer.flush().await
        }
        .await;
        match step {
            // proto.md: "the server SHOULD gracefully handle the client
            // sending an NBD_OPT_ABORT and closing the connection without
            // waiting for a reply".
            Step::Abort => return Ok(Negotiated::Aborted),
            Step::Continue => written?,
            Step::Transmission(session) => {
                written?;
                info!(
                    export = %session.export.name,
                    size = session.size,
                    flags = ?session.flags,
                    structured = session.structured,
                    meta_context = session.meta_context.is_some(),
                    "entering transmission"
                );
                return Ok(Negotiated::Transmission(session));
            }
        }
    }
}

/// Fills `buf` from `reader`. `Ok(false)` when the peer closed before the
/// first byte (a clean end between messages); an error when it closed in the
/// middle.
pub(crate) async fn read_message<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut [u8],
) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]).await? {
            0 if filled == 0 => return Ok(false),
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "peer closed the connection {filled} bytes into a {} byte message",
                        buf.len()
                    ),
                ));
            }
            n => filled += n,
        }
    }
    Ok(true)
}

/// What to do after an option's replies are sent.
#[derive(Debug)]
pub enum Step {
    Continue,
    Abort,
    Transmission(Session),
}

/// The negotiation state: what the client has asked for so far.
pub struct Negotiation<'a> {
    exports: &'a [Export],
    limits: &'a Limits,
    no_zeroes: bool,
    structured: bool,
    /// The export for which `base:allocation` was selected by the last
    /// `NBD_OPT_SET_META_CONTEXT`, if any.
    meta_context_export: Option<usize>,
}

impl<'a> Negotiation<'a> {
    pub fn new(exports: &'a [Export], limits: &'a Limits, client_flags: ClientFlags) -> Self {
        Negotiation {
            exports,
            limits,
            no_zeroes: client_flags.contains(ClientFlags::NO_ZEROES),
            structured: false,
            meta_context_export: None,
        }
    }

    /// Handles one option: appends its replies to `out` and says what
    /// comes next.
    pub fn option(
        &mut self,
        code: OptionCode,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Step, HandshakeError> {
        let option = match ClientOption::read(code, data) {
            Ok(option) => option,
            Err(e) if code == OptionCode::EXPORT_NAME => return Err(e.into()),
            Err(e) => {
                debug!(option = ?code, error = %e, "malformed option");
                return Ok(self.error(code, OptionReplyType::ERR_INVALID, &e.to_string(), out));
            }
        };
        debug!(?option, "option");
        match option {
            ClientOption::ExportName(name) => self.export_name(&name, out),
            ClientOption::Abort => {
                OptionReply::Ack.encode(code, out);
                Ok(Step::Abort)
            }
            ClientOption::List => Ok(self.list(out)),
            ClientOption::StartTls => Ok(self.error(
                code,
                OptionReplyType::ERR_POLICY,
                "TLS is not available on this server",
                out,
            )),
            ClientOption::Info(request) => Ok(self.info_or_go(code, &request, out)),
            ClientOption::Go(request) => Ok(self.info_or_go(code, &request, out)),
            ClientOption::StructuredReply => {
                self.structured = true;
                OptionReply::Ack.encode(code, out);
                Ok(Step::Continue)
            }
            ClientOption::ListMetaContext(request) => Ok(self.list_meta_context(&request, out)),
            ClientOption::SetMetaContext(request) => Ok(self.set_meta_context(&request, out)),
            ClientOption::Unsupported(code) => Ok(self.error(
                code,
                OptionReplyType::ERR_UNSUP,
                &format!("option {code:?} is not supported by this server"),
                out,
            )),
        }
    }

    /// `""` is the default export, the first one.
    fn find(&self, name: &str) -> Option<usize> {
        if name.is_empty() {
            return (!self.exports.is_empty()).then_some(0);
        }
        self.exports.iter().position(|e| e.name == name)
    }

    fn session(&self, index: usize) -> Session {
        let meta = (self.meta_context_export == Some(index)).then_some(BASE_ALLOCATION_ID);
        Session::new(&self.exports[index], self.structured, meta, self.limits)
    }

    fn error(
        &self,
        code: OptionCode,
        kind: OptionReplyType,
        message: &str,
        out: &mut Vec<u8>,
    ) -> Step {
        OptionReply::Error { kind, message }.encode(code, out);
        Step::Continue
    }

    fn export_name(&self, name: &str, out: &mut Vec<u8>) -> Result<Step, HandshakeError> {
        let index = self
            .find(name)
            .ok_or_else(|| HandshakeError::UnknownExport(name.to_owned()))?;
        let session = self.session(index);
        encode_export_name_reply(session.size, session.flags, self.no_zeroes, out);
        Ok(Step::Transmission(session))
    }

    fn list(&self, out: &mut Vec<u8>) -> Step {
        for export in self.exports {
            OptionReply::Server {
                name: &export.name,
                description: &export.description,
            }
            .encode(OptionCode::LIST, out);
        }
        OptionReply::Ack.encode(OptionCode::LIST, out);
        Step::Continue
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO` share their replies; GO then enters
    /// transmission. `NBD_INFO_EXPORT` and `NBD_INFO_BLOCK_SIZE` are always
    /// sent (the server "MAY send information requests back which are not
    /// explicitly requested"), name and description when asked for.
    fn info_or_go(&self, code: OptionCode, request: &ExportRequest, out: &mut Vec<u8>) -> Step {
        let Some(index) = self.find(&request.name) else {
            let message = format!("export {:?} does not exist", request.name);
            return self.error(code, OptionReplyType::ERR_UNKNOWN, &message, out);
        };
        let export = &self.exports[index];
        let session = self.session(index);
        let infos = [
            Some(Info::Export {
                size: session.size,
                flags: session.flags,
            }),
            Some(Info::BlockSize {
                // Any offset and length is served: the backend does
                // read-modify-write of partial sectors.
                minimum: 1,
                preferred: export.backend.block_size(),
                maximum: self.limits.max_request_bytes,
            }),
            request
                .info_requests
                .contains(&InfoType::NAME)
                .then_some(Info::Name(&export.name)),
            (request.info_requests.contains(&InfoType::DESCRIPTION)
                && !export.description.is_empty())
            .then_some(Info::Description(&export.description)),
        ];
        for info in infos.into_iter().flatten() {
            OptionReply::Info(info).encode(code, out);
        }
        OptionReply::Ack.encode(code, out);
        if code == OptionCode::GO {
            Step::Transmission(session)
        } else {
            Step::Continue
        }
    }

    /// The contexts of the `base` namespace a query matches: `base:` is the
    /// wildcard (only when listing), `base:allocation` itself; other leaves
    /// and other namespaces match nothing and are ignored, as proto.md
    /// requires.
    fn matches(query: &MetaContextQuery, listing: bool) -> bool {
        query.namespace == "base"
            && (query.leaf == "allocation" || (listing && query.leaf.is_empty()))
    }

    /// Common checks of the two meta context options: structured replies
    /// first, and an export that exists.
    fn meta_context_export(
        &self,
        code: OptionCode,
        request: &MetaContextRequest,
        out: &mut Vec<u8>,
    ) -> Option<usize> {
        if !self.structured {
            self.error(
                code,
                OptionReplyType::ERR_INVALID,
                "negotiate NBD_OPT_STRUCTURED_REPLY before metadata contexts",
                out,
            );
            return None;
        }
        let index = self.find(&request.export);
        if index.is_none() {
            let message = format!("export {:?} does not exist", request.export);
            self.error(code, OptionReplyType::ERR_UNKNOWN, &message, out);
        }
        index
    }

    fn list_meta_context(&self, request: &MetaContextRequest, out: &mut Vec<u8>) -> Step {
        let code = OptionCode::LIST_META_CONTEXT;
        if self.meta_context_export(code, request, out).is_none() {
            return Step::Continue;
        }
        // No query: every context available.
        if request.queries.is_empty() || request.queries.iter().any(|q| Self::matches(q, true)) {
            // "The metadata context ID in these replies is reserved and
            // SHOULD be set to zero."
            OptionReply::MetaContext {
                id: 0,
                name: BASE_ALLOCATION,
            }
            .encode(code, out);
        }
        OptionReply::Ack.encode(code, out);
        Step::Continue
    }

    fn set_meta_context(&mut self, request: &MetaContextRequest, out: &mut Vec<u8>) -> Step {
        let code = OptionCode::SET_META_CONTEXT;
        // "Issuing this command replaces all previously-set metadata
        // contexts (including when this command fails)."
        self.meta_context_export = None;
        let Some(index) = self.meta_context_export(code, request, out) else {
            return Step::Continue;
        };
        if request.queries.iter().any(|q| Self::matches(q, false)) {
            self.meta_context_export = Some(index);
            OptionReply::MetaContext {
                id: BASE_ALLOCATION_ID,
                name: BASE_ALLOCATION,
            }
            .encode(code, out);
        }
        OptionReply::Ack.encode(code, out);
        Step::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto::wire::{IHAVEOPT, OPTION_REPLY_MAGIC};
    use crate::nbd::testing::{MemBackend, export};
    use proptest::prelude::*;
    use tokio::io::{DuplexStream, duplex};
    use tokio::task::JoinHandle;

    type Server = JoinHandle<Result<Negotiated, HandshakeError>>;

    fn exports() -> Vec<Export> {
        vec![
            export("disk", MemBackend::new(1 << 20, 4096, true), false),
            export("ro", MemBackend::new(8192, 512, false), true),
        ]
    }

    /// A server negotiating over an in-memory pipe; the test holds the
    /// client's end.
    fn start() -> (DuplexStream, Server) {
        let (client, server) = duplex(1 << 20);
        let handle = tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(server);
            negotiate(&mut r, &mut w, &exports(), &Limits::default()).await
        });
        (client, handle)
    }

    /// Reads the greeting and answers with `flags`.
    async fn greet(client: &mut DuplexStream, flags: u32) {
        let mut greeting = [0; 18];
        client.read_exact(&mut greeting).await.unwrap();
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(&greeting[16..], &[0, 3], "FIXED_NEWSTYLE | NO_ZEROES");
        client.write_all(&flags.to_be_bytes()).await.unwrap();
    }

    async fn connect() -> (DuplexStream, Server) {
        let (mut client, server) = start();
        greet(&mut client, 3).await;
        (client, server)
    }

    async fn send(client: &mut DuplexStream, code: OptionCode, data: &[u8]) {
        let mut msg = IHAVEOPT.to_be_bytes().to_vec();
        msg.extend_from_slice(&code.0.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        client.write_all(&msg).await.unwrap();
    }

    /// One option reply: (option, reply type, data).
    async fn reply(client: &mut DuplexStream) -> (OptionCode, OptionReplyType, Vec<u8>) {
        let mut header = [0; 20];
        client.read_exact(&mut header).await.unwrap();
        assert_eq!(&header[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        let option = OptionCode(u32::from_be_bytes(header[8..12].try_into().unwrap()));
        let kind = OptionReplyType(u32::from_be_bytes(header[12..16].try_into().unwrap()));
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap());
        let mut data = vec![0; len as usize];
        client.read_exact(&mut data).await.unwrap();
        (option, kind, data)
    }

    async fn expect(
        client: &mut DuplexStream,
        option: OptionCode,
        kind: OptionReplyType,
    ) -> Vec<u8> {
        let (o, k, data) = reply(client).await;
        assert_eq!(
            (o, k),
            (option, kind),
            "reply data {:?}",
            String::from_utf8_lossy(&data)
        );
        data
    }

    fn export_request(name: &str, infos: &[InfoType]) -> Vec<u8> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for info in infos {
            data.extend_from_slice(&info.0.to_be_bytes());
        }
        data
    }

    fn meta_request(export: &str, queries: &[&str]) -> Vec<u8> {
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            data.extend_from_slice(&(q.len() as u32).to_be_bytes());
            data.extend_from_slice(q.as_bytes());
        }
        data
    }

    async fn structured(client: &mut DuplexStream) {
        send(client, OptionCode::STRUCTURED_REPLY, &[]).await;
        expect(client, OptionCode::STRUCTURED_REPLY, OptionReplyType::ACK).await;
    }

    /// Ends with NBD_OPT_ABORT and checks the server stops cleanly.
    async fn abort(mut client: DuplexStream, server: Server) {
        send(&mut client, OptionCode::ABORT, &[]).await;
        expect(&mut client, OptionCode::ABORT, OptionReplyType::ACK).await;
        assert!(matches!(server.await.unwrap(), Ok(Negotiated::Aborted)));
    }

    async fn session(server: Server) -> Session {
        match server.await.unwrap() {
            Ok(Negotiated::Transmission(session)) => session,
            other => panic!("expected transmission, got {other:?}"),
        }
    }

    fn info_export(data: &[u8]) -> (u64, TransmissionFlags) {
        assert_eq!(data.len(), 12);
        assert_eq!(&data[..2], &[0, 0]);
        (
            u64::from_be_bytes(data[2..10].try_into().unwrap()),
            TransmissionFlags(u16::from_be_bytes(data[10..12].try_into().unwrap())),
        )
    }

    #[tokio::test]
    async fn export_name_enters_transmission_with_padding_unless_no_zeroes() {
        for (client_flags, reply_len) in [(1u32, 134usize), (3, 10), (0, 134)] {
            let (mut client, server) = start();
            greet(&mut client, client_flags).await;
            send(&mut client, OptionCode::EXPORT_NAME, b"disk").await;
            let mut reply = vec![0; reply_len];
            client.read_exact(&mut reply).await.unwrap();
            assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), 1 << 20);
            assert!(reply[10..].iter().all(|&b| b == 0));
            let session = session(server).await;
            assert_eq!(session.export.name, "disk");
            assert_eq!(session.flags.0, u16::from_be_bytes([reply[8], reply[9]]));
            assert!(!session.structured);
            // Nothing after the reply.
            drop(session);
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        }
    }

    #[tokio::test]
    async fn export_name_of_the_default_export_is_the_first() {
        let (mut client, server) = connect().await;
        send(&mut client, OptionCode::EXPORT_NAME, b"").await;
        let mut reply = [0; 10];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(session(server).await.export.name, "disk");
    }

    #[tokio::test]
    async fn export_name_of_an_unknown_export_closes() {
        let (mut client, server) = connect().await;
        send(&mut client, OptionCode::EXPORT_NAME, b"nope").await;
        assert!(matches!(
            server.await.unwrap(),
            Err(HandshakeError::UnknownExport(name)) if name == "nope"
        ));
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "no reply to a failed EXPORT_NAME");
    }

    #[tokio::test]
    async fn malformed_export_name_closes() {
        let (mut client, server) = connect().await;
        send(&mut client, OptionCode::EXPORT_NAME, &[0xff]).await;
        assert!(matches!(
            server.await.unwrap(),
            Err(HandshakeError::Protocol(ProtoError::InvalidUtf8))
        ));
    }

    #[tokio::test]
    async fn go_answers_every_info_and_enters_transmission() {
        let (mut client, server) = connect().await;
        structured(&mut client).await;
        let infos = [
            InfoType::NAME,
            InfoType::DESCRIPTION,
            InfoType::BLOCK_SIZE,
            InfoType(99),
        ];
        send(&mut client, OptionCode::GO, &export_request("", &infos)).await;
        let mut seen = Vec::new();
        loop {
            let (option, kind, data) = reply(&mut client).await;
            assert_eq!(option, OptionCode::GO);
            if kind == OptionReplyType::ACK {
                assert!(data.is_empty());
                break;
            }
            assert_eq!(kind, OptionReplyType::INFO);
            let info = InfoType(u16::from_be_bytes([data[0], data[1]]));
            match info {
                InfoType::EXPORT => {
                    let (size, flags) = info_export(&data);
                    assert_eq!(size, 1 << 20);
                    let expected = TransmissionFlags::HAS_FLAGS
                        | TransmissionFlags::SEND_FLUSH
                        | TransmissionFlags::SEND_FUA
                        | TransmissionFlags::SEND_TRIM
                        | TransmissionFlags::SEND_WRITE_ZEROES
                        | TransmissionFlags::SEND_DF
                        | TransmissionFlags::CAN_MULTI_CONN
                        | TransmissionFlags::SEND_CACHE
                        | TransmissionFlags::SEND_FAST_ZERO;
                    assert_eq!(flags, expected);
                }
                InfoType::NAME => assert_eq!(&data[2..], b"disk"),
                InfoType::DESCRIPTION => assert_eq!(&data[2..], b"test export disk"),
                InfoType::BLOCK_SIZE => {
                    assert_eq!(data.len(), 14);
                    assert_eq!(&data[2..6], &1u32.to_be_bytes());
                    assert_eq!(&data[6..10], &4096u32.to_be_bytes());
                    assert_eq!(&data[10..14], &(32u32 << 20).to_be_bytes());
                }
                other => panic!("unexpected info {other:?}"),
            }
            seen.push(info);
        }
        seen.sort_by_key(|i| i.0);
        assert_eq!(
            seen,
            [
                InfoType::EXPORT,
                InfoType::NAME,
                InfoType::DESCRIPTION,
                InfoType::BLOCK_SIZE
            ]
        );
        let session = session(server).await;
        assert!(session.structured);
        assert_eq!(session.meta_context, None);
    }

    #[tokio::test]
    async fn info_does_not_end_the_negotiation_and_omits_unrequested_names() {
        let (mut client, server) = connect().await;
        send(&mut client, OptionCode::INFO, &export_request("ro", &[])).await;
        let data = expect(&mut client, OptionCode::INFO, OptionReplyType::INFO).await;
        let (size, flags) = info_export(&data);
        assert_eq!(size, 8192);
        let expected = TransmissionFlags::HAS_FLAGS
            | TransmissionFlags::READ_ONLY
            | TransmissionFlags::SEND_FLUSH
            | TransmissionFlags::CAN_MULTI_CONN
            | TransmissionFlags::SEND_CACHE;
        assert_eq!(
            flags, expected,
            "read-only: no write flags, no DF without structured replies"
        );
        let data = expect(&mut client, OptionCode::INFO, OptionReplyType::INFO).await;
        assert_eq!(&data[..2], &InfoType::BLOCK_SIZE.0.to_be_bytes());
        expect(&mut client, OptionCode::INFO, OptionReplyType::ACK).await;
        abort(client, server).await;
    }

    #[tokio::test]
    async fn info_and_go_of_an_unknown_export_are_errors_and_negotiation_goes_on() {
        let (mut client, server) = connect().await;
        for code in [OptionCode::INFO, OptionCode::GO] {
            send(&mut client, code, &export_request("nope", &[])).await;
            let message = expect(&mut client, code, OptionReplyType::ERR_UNKNOWN).await;
            assert!(String::from_utf8(message).unwrap().contains("nope"));
        }
        send(&mut client, OptionCode::GO, &export_request("ro", &[])).await;
        expect(&mut client, OptionCode::GO, OptionReplyType::INFO).await;
        expect(&mut client, OptionCode::GO, OptionReplyType::INFO).await;
        expect(&mut client, OptionCode::GO, OptionReplyType::ACK).await;
        assert_eq!(session(server).await.export.name, "ro");
    }

    #[tokio::test]
    async fn malformed_info_and_go_are_invalid_and_negotiation_goes_on() {
        let (mut client, server) = connect().await;
        let mut trailing = export_request("disk", &[]);
        trailing.push(0);
        let mut long_name = export_request("disk", &[]);
        long_name[3] = 100;
        for data in [trailing, long_name, vec![0, 0], Vec::new()] {
            send(&mut client, OptionCode::GO, &data).await;
            expect(&mut client, OptionCode::GO, OptionReplyType::ERR_INVALID).await;
        }
        abort(client, server).await;
    }

    #[tokio::test]
    async fn list_names_every_export() {
        let (mut client, server) = connect().await;
        send(&mut client, OptionCode::LIST, &[]).await;
        for (name, description) in [("disk", "test export disk"), ("ro", "test export ro")] {
            let data = expect(&mut client, OptionCode::LIST, OptionReplyType::SERVER).await;
            let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
            assert_eq!(&data[4..4 + len], name.as_bytes());
            assert_eq!(&data[4 + len..], description.as_bytes());
        }
        expect(&mut client, OptionCode::LIST, OptionReplyType::ACK).await;
        send(&mut client, OptionCode::LIST, b"x").await;
        expect(&mut client, OptionCode::LIST, OptionReplyType::ERR_INVALID).await;
        abort(client, server).await;
    }

    #[tokio::test]
    async fn abort_ignores_its_data() {
        let (mut client, server) = connect().await;
        send(&mut client, OptionCode::ABORT, b"bye").await;
        expect(&mut client, OptionCode::ABORT, OptionReplyType::ACK).await;
        assert!(matches!(server.await.unwrap(), Ok(Negotiated::Aborted)));
    }

    #[tokio::test]
    async fn abort_without_waiting_for_the_reply_is_fine() {
        let (mut client, server) = connect().await;
        send(&mut client, OptionCode::ABORT, &[]).await;
        drop(client);
        assert!(matches!(server.await.unwrap(), Ok(Negotiated::Aborted)));
    }

    #[tokio::test]
    async fn starttls_is_refused_by_policy() {
        let (mut client, server) = connect().await;
        send(&mut client, OptionCode::STARTTLS, &[]).await;
        expect(
            &mut client,
            OptionCode::STARTTLS,
            OptionReplyType::ERR_POLICY,
        )
        .await;
        send(&mut client, OptionCode::STARTTLS, &[1]).await;
        expect(
            &mut client,
            OptionCode::STARTTLS,
            OptionReplyType::ERR_INVALID,
        )
        .await;
        abort(client, server).await;
    }

    #[tokio::test]
    async fn unknown_options_are_unsupported_and_negotiation_goes_on() {
        let (mut client, server) = connect().await;
        for (code, data) in [
            (OptionCode(0x1234_5678), &b"some data"[..]),
            (OptionCode::EXTENDED_HEADERS, &[][..]),
            (OptionCode::PEEK_EXPORT, &[][..]),
            (OptionCode(0), &[][..]),
        ] {
            send(&mut client, code, data).await;
            expect(&mut client, code, OptionReplyType::ERR_UNSUP).await;
        }
        send(&mut client, OptionCode::GO, &export_request("disk", &[])).await;
        expect(&mut client, OptionCode::GO, OptionReplyType::INFO).await;
        expect(&mut client, OptionCode::GO, OptionReplyType::INFO).await;
        expect(&mut client, OptionCode::GO, OptionReplyType::ACK).await;
        assert_eq!(session(server).await.export.name, "disk");
    }

    #[tokio::test]
    async fn structured_reply_refuses_data() {
        let (mut client, server) = connect().await;
        send(&mut client, OptionCode::STRUCTURED_REPLY, &[0]).await;
        expect(
            &mut client,
            OptionCode::STRUCTURED_REPLY,
            OptionReplyType::ERR_INVALID,
        )
        .await;
        send(&mut client, OptionCode::EXPORT_NAME, b"disk").await;
        let mut reply = [0; 10];
        client.read_exact(&mut reply).await.unwrap();
        assert!(!session(server).await.structured);
    }

    /// The contexts a meta context reply lists, up to its ACK.
    async fn contexts(client: &mut DuplexStream, code: OptionCode) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        loop {
            let (option, kind, data) = reply(client).await;
            assert_eq!(option, code);
            match kind {
                OptionReplyType::ACK => return out,
                OptionReplyType::META_CONTEXT => out.push((
                    u32::from_be_bytes(data[..4].try_into().unwrap()),
                    String::from_utf8(data[4..].to_vec()).unwrap(),
                )),
                other => panic!("unexpected {other:?}: {}", String::from_utf8_lossy(&data)),
            }
        }
    }

    #[tokio::test]
    async fn meta_contexts_need_structured_replies() {
        let (mut client, server) = connect().await;
        for code in [OptionCode::LIST_META_CONTEXT, OptionCode::SET_META_CONTEXT] {
            send(
                &mut client,
                code,
                &meta_request("disk", &["base:allocation"]),
            )
            .await;
            expect(&mut client, code, OptionReplyType::ERR_INVALID).await;
        }
        abort(client, server).await;
    }

    #[tokio::test]
    async fn list_meta_context_query_forms() {
        let (mut client, server) = connect().await;
        structured(&mut client).await;
        let list = OptionCode::LIST_META_CONTEXT;
        let base = vec![(0, BASE_ALLOCATION.to_owned())];
        for (queries, expected) in [
            (&[][..], &base),
            (&["base:"][..], &base),
            (&["base:allocation"][..], &base),
            (&["base:allocation", "base:"][..], &base),
            (&["base:other"][..], &vec![]),
            (&["qemu:dirty-bitmap:x", "x-foo:"][..], &vec![]),
        ] {
            send(&mut client, list, &meta_request("disk", queries)).await;
            assert_eq!(&contexts(&mut client, list).await, expected, "{queries:?}");
        }
        send(&mut client, list, &meta_request("nope", &[])).await;
        expect(&mut client, list, OptionReplyType::ERR_UNKNOWN).await;
        send(&mut client, list, &meta_request("disk", &["allocation"])).await;
        expect(&mut client, list, OptionReplyType::ERR_INVALID).await;
        let mut truncated = meta_request("disk", &["base:allocation"]);
        truncated.pop();
        send(&mut client, list, &truncated).await;
        expect(&mut client, list, OptionReplyType::ERR_INVALID).await;
        abort(client, server).await;
    }

    #[tokio::test]
    async fn set_meta_context_selects_base_allocation_for_that_export_only() {
        let set = OptionCode::SET_META_CONTEXT;
        let go = |name: &'static str| async move {
            let (mut client, server) = connect().await;
            structured(&mut client).await;
            (client, server, name)
        };
        // Selected for "disk", GO "disk" by its default name.
        let (mut client, server, _) = go("disk").await;
        send(
            &mut client,
            set,
            &meta_request("disk", &["base:", "base:allocation", "base:allocation"]),
        )
        .await;
        assert_eq!(
            contexts(&mut client, set).await,
            vec![(BASE_ALLOCATION_ID, BASE_ALLOCATION.to_owned())]
        );
        send(&mut client, OptionCode::GO, &export_request("", &[])).await;
        for _ in 0..2 {
            expect(&mut client, OptionCode::GO, OptionReplyType::INFO).await;
        }
        expect(&mut client, OptionCode::GO, OptionReplyType::ACK).await;
        assert_eq!(session(server).await.meta_context, Some(BASE_ALLOCATION_ID));

        // Selected for "ro", GO "disk": nothing selected.
        let (mut client, server, _) = go("ro").await;
        send(&mut client, set, &meta_request("ro", &["base:allocation"])).await;
        assert_eq!(contexts(&mut client, set).await.len(), 1);
        send(&mut client, OptionCode::EXPORT_NAME, b"disk").await;
        let mut reply = [0; 10];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(session(server).await.meta_context, None);

        // "base:" selects nothing; a failed SET clears an earlier one.
        let (mut client, server, _) = go("disk").await;
        send(&mut client, set, &meta_request("disk", &["base:"])).await;
        assert!(contexts(&mut client, set).await.is_empty());
        send(
            &mut client,
            set,
            &meta_request("disk", &["base:allocation"]),
        )
        .await;
        assert_eq!(contexts(&mut client, set).await.len(), 1);
        send(
            &mut client,
            set,
            &meta_request("nope", &["base:allocation"]),
        )
        .await;
        expect(&mut client, set, OptionReplyType::ERR_UNKNOWN).await;
        send(&mut client, OptionCode::EXPORT_NAME, b"disk").await;
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(session(server).await.meta_context, None);
    }

    #[tokio::test]
    async fn bad_client_flags_close() {
        let (mut client, server) = start();
        greet(&mut client, 1 << 5).await;
        assert!(matches!(
            server.await.unwrap(),
            Err(HandshakeError::Protocol(ProtoError::UnknownClientFlags(32)))
        ));
    }

    #[tokio::test]
    async fn bad_option_magic_closes() {
        let (mut client, server) = connect().await;
        client
            .write_all(b"IHAVEOPX\0\0\0\x07\0\0\0\0")
            .await
            .unwrap();
        assert!(matches!(
            server.await.unwrap(),
            Err(HandshakeError::Protocol(ProtoError::BadMagic { .. }))
        ));
    }

    #[tokio::test]
    async fn oversized_option_is_refused_before_its_data_arrives() {
        let (mut client, server) = connect().await;
        let mut header = IHAVEOPT.to_be_bytes().to_vec();
        header.extend_from_slice(&OptionCode::GO.0.to_be_bytes());
        header.extend_from_slice(&u32::MAX.to_be_bytes());
        client.write_all(&header).await.unwrap();
        // The client keeps the connection open and sends nothing more: the
        // server decides on the header alone.
        assert!(matches!(
            server.await.unwrap(),
            Err(HandshakeError::Protocol(ProtoError::OptionTooLarge {
                length: u32::MAX,
                ..
            }))
        ));
        drop(client);
    }

    #[tokio::test]
    async fn short_messages_are_errors_and_clean_ends_are_not() {
        // Gone after the greeting.
        let (mut client, server) = start();
        let mut greeting = [0; 18];
        client.read_exact(&mut greeting).await.unwrap();
        drop(client);
        assert!(matches!(server.await.unwrap(), Ok(Negotiated::Closed)));

        // Gone between options.
        let (client, server) = connect().await;
        drop(client);
        assert!(matches!(server.await.unwrap(), Ok(Negotiated::Closed)));

        // Gone in the middle of an option header.
        let (mut client, server) = connect().await;
        client
            .write_all(&IHAVEOPT.to_be_bytes()[..5])
            .await
            .unwrap();
        drop(client);
        assert!(matches!(
            server.await.unwrap(),
            Err(HandshakeError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof
        ));

        // Gone in the middle of an option's data.
        let (mut client, server) = connect().await;
        let mut msg = IHAVEOPT.to_be_bytes().to_vec();
        msg.extend_from_slice(&OptionCode::GO.0.to_be_bytes());
        msg.extend_from_slice(&10u32.to_be_bytes());
        msg.extend_from_slice(&[0; 5]);
        client.write_all(&msg).await.unwrap();
        drop(client);
        assert!(matches!(
            server.await.unwrap(),
            Err(HandshakeError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof
        ));

        // Client flags cut short.
        let (mut client, server) = start();
        client.read_exact(&mut greeting).await.unwrap();
        client.write_all(&[0, 0]).await.unwrap();
        drop(client);
        assert!(matches!(server.await.unwrap(), Err(HandshakeError::Io(_))));
    }

    #[test]
    fn transmission_flags_follow_the_export() {
        let trims = export("a", MemBackend::new(4096, 512, true), false);
        let no_trim = export("b", MemBackend::new(4096, 512, false), false);
        assert!(transmission_flags(&trims, false).contains(TransmissionFlags::SEND_TRIM));
        assert!(!transmission_flags(&no_trim, true).contains(TransmissionFlags::SEND_TRIM));
        assert!(transmission_flags(&no_trim, true).contains(TransmissionFlags::SEND_DF));
        assert!(!transmission_flags(&no_trim, false).contains(TransmissionFlags::SEND_DF));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Any byte stream after the greeting ends the negotiation one way
        /// or another (the client's end closes after the bytes): no panic,
        /// no hang.
        #[test]
        fn random_client_bytes_end_cleanly_or_with_an_error(
            flags in prop_oneof![Just(3u32), Just(1u32), any::<u32>()],
            options in proptest::collection::vec(
                (0u32..12, proptest::collection::vec(any::<u8>(), 0..64)),
                0..6,
            ),
            garbage in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut bytes = flags.to_be_bytes().to_vec();
            for (code, data) in &options {
                bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
                bytes.extend_from_slice(&code.to_be_bytes());
                bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
                bytes.extend_from_slice(data);
            }
            bytes.extend_from_slice(&garbage);
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let (mut client, server) = start();
                let reader = tokio::spawn(async move {
                    client.write_all(&bytes).await.unwrap();
                    client.shutdown().await.unwrap();
                    let mut sink = Vec::new();
                    let _ = client.read_to_end(&mut sink).await;
                });
                // Ok or a specific error; either way the task finished.
                let _ = server.await.unwrap();
                reader.await.unwrap();
            });
        }
    }
}
