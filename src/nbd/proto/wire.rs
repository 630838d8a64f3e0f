//! The protocol's numbers: magics, and every code the client or the server
//! puts on the wire, as open enums (a newtype around the integer with named
//! constants). An unknown option or command number is still a value, so it
//! can be logged by name when it has one and echoed back in an error reply
//! (`NBD_REP_ERR_UNSUP` carries the option it refuses).
//!
//! Values and names follow NetworkBlockDevice/nbd `doc/proto.md`, section
//! "Values".

use std::fmt;

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: follows `NBDMAGIC` in the greeting and opens every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Opens every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Opens every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Opens every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Opens every structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Defines an open enum: the integer travels unchanged, known values have
/// names, and `Debug` prints the name or the number.
macro_rules! open_enum {
    ($(#[$meta:meta])* $name:ident($int:ty) {
        $($(#[$vmeta:meta])* $variant:ident = $value:expr,)*
    }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub $int);

        impl $name {
            $($(#[$vmeta])* pub const $variant: $name = $name($value);)*

            /// The protocol's name for this value, if it has one.
            pub fn name(self) -> Option<&'static str> {
                match self {
                    $(Self::$variant => Some(stringify!($variant)),)*
                    _ => None,
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                match self.name() {
                    Some(name) => f.write_str(name),
                    None => write!(f, "{}({:#x})", stringify!($name), self.0),
                }
            }
        }
    };
}

/// Defines a set of flag bits: named bits, `contains`, union, and the bits
/// outside a given set (to reject what was not offered).
macro_rules! flag_set {
    ($(#[$meta:meta])* $name:ident($int:ty) {
        $($(#[$vmeta:meta])* $flag:ident = $value:expr,)*
    }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
        pub struct $name(pub $int);

        impl $name {
            $($(#[$vmeta])* pub const $flag: $name = $name($value);)*
            pub const EMPTY: $name = $name(0);

            pub fn contains(self, other: $name) -> bool {
                self.0 & other.0 == other.0
            }

            /// The bits of `self` that are not in `allowed`.
            pub fn outside(self, allowed: $name) -> $name {
                $name(self.0 & !allowed.0)
            }

            pub fn is_empty(self) -> bool {
                self.0 == 0
            }
        }

        impl std::ops::BitOr for $name {
            type Output = $name;
            fn bitor(self, rhs: $name) -> $name {
                $name(self.0 | rhs.0)
            }
        }

        impl std::ops::BitOrAssign for $name {
            fn bitor_assign(&mut self, rhs: $name) {
                self.0 |= rhs.0;
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut rest = self.0;
                let mut first = true;
                for (name, bit) in [$((stringify!($flag), $value)),*] {
                    if rest & bit != 0 {
                        if !first {
                            f.write_str("|")?;
                        }
                        f.write_str(name)?;
                        rest &= !bit;
                        first = false;
                    }
                }
                if rest != 0 || first {
                    if !first {
                        f.write_str("|")?;
                    }
                    write!(f, "{rest:#x}")?;
                }
                Ok(())
            }
        }
    };
}

flag_set! {
    /// Handshake flags, sent by the server in the greeting.
    HandshakeFlags(u16) {
        FIXED_NEWSTYLE = 1 << 0,
        NO_ZEROES = 1 << 1,
    }
}

flag_set! {
    /// Client flags, the client's answer to the greeting.
    ClientFlags(u32) {
        FIXED_NEWSTYLE = 1 << 0,
        NO_ZEROES = 1 << 1,
    }
}

flag_set! {
    /// Transmission flags, sent with the export's size when the handshake ends.
    TransmissionFlags(u16) {
        HAS_FLAGS = 1 << 0,
        READ_ONLY = 1 << 1,
        SEND_FLUSH = 1 << 2,
        SEND_FUA = 1 << 3,
        ROTATIONAL = 1 << 4,
        SEND_TRIM = 1 << 5,
        SEND_WRITE_ZEROES = 1 << 6,
        SEND_DF = 1 << 7,
        CAN_MULTI_CONN = 1 << 8,
        SEND_RESIZE = 1 << 9,
        SEND_CACHE = 1 << 10,
        SEND_FAST_ZERO = 1 << 11,
        BLOCK_STATUS_PAYLOAD = 1 << 12,
    }
}

flag_set! {
    /// Command flags, sent by the client with every request.
    CommandFlags(u16) {
        FUA = 1 << 0,
        NO_HOLE = 1 << 1,
        DF = 1 << 2,
        REQ_ONE = 1 << 3,
        FAST_ZERO = 1 << 4,
        PAYLOAD_LEN = 1 << 5,
    }
}

flag_set! {
    /// Structured reply chunk flags.
    ReplyFlags(u16) {
        DONE = 1 << 0,
    }
}

flag_set! {
    /// Status flags of a `base:allocation` extent.
    AllocationFlags(u32) {
        HOLE = 1 << 0,
        ZERO = 1 << 1,
    }
}

open_enum! {
    /// Option codes of the handshake (`NBD_OPT_*`).
    OptionCode(u32) {
        EXPORT_NAME = 1,
        ABORT = 2,
        LIST = 3,
        PEEK_EXPORT = 4,
        STARTTLS = 5,
        INFO = 6,
        GO = 7,
        STRUCTURED_REPLY = 8,
        LIST_META_CONTEXT = 9,
        SET_META_CONTEXT = 10,
        EXTENDED_HEADERS = 11,
    }
}

open_enum! {
    /// Option reply types (`NBD_REP_*`); errors have bit 31 set.
    OptionReplyType(u32) {
        ACK = 1,
        SERVER = 2,
        INFO = 3,
        META_CONTEXT = 4,
        ERR_UNSUP = (1 << 31) + 1,
        ERR_POLICY = (1 << 31) + 2,
        ERR_INVALID = (1 << 31) + 3,
        ERR_PLATFORM = (1 << 31) + 4,
        ERR_TLS_REQD = (1 << 31) + 5,
        ERR_UNKNOWN = (1 << 31) + 6,
        ERR_SHUTDOWN = (1 << 31) + 7,
        ERR_BLOCK_SIZE_REQD = (1 << 31) + 8,
        ERR_TOO_BIG = (1 << 31) + 9,
        ERR_EXT_HEADER_REQD = (1 << 31) + 10,
    }
}

open_enum! {
    /// Information types of `NBD_OPT_INFO`/`NBD_OPT_GO` (`NBD_INFO_*`).
    InfoType(u16) {
        EXPORT = 0,
        NAME = 1,
        DESCRIPTION = 2,
        BLOCK_SIZE = 3,
    }
}

open_enum! {
    /// Transmission commands (`NBD_CMD_*`).
    Command(u16) {
        READ = 0,
        WRITE = 1,
        DISC = 2,
        FLUSH = 3,
        TRIM = 4,
        CACHE = 5,
        WRITE_ZEROES = 6,
        BLOCK_STATUS = 7,
        RESIZE = 8,
    }
}

open_enum! {
    /// Structured reply chunk types (`NBD_REPLY_TYPE_*`); errors have bit 15 set.
    ReplyType(u16) {
        NONE = 0,
        OFFSET_DATA = 1,
        OFFSET_HOLE = 2,
        BLOCK_STATUS = 5,
        BLOCK_STATUS_EXT = 6,
        ERROR = (1 << 15) + 1,
        ERROR_OFFSET = (1 << 15) + 2,
    }
}

open_enum! {
    /// The error values a reply may carry: exactly the protocol's list
    /// ("Error values"); nothing else ever reaches the wire.
    WireError(u32) {
        OK = 0,
        EPERM = 1,
        EIO = 5,
        ENOMEM = 12,
        EINVAL = 22,
        ENOSPC = 28,
        EOVERFLOW = 75,
        ENOTSUP = 95,
        ESHUTDOWN = 108,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_names_known_values_and_shows_unknown_ones() {
        assert_eq!(format!("{:?}", OptionCode::GO), "GO");
        assert_eq!(format!("{:?}", OptionCode(42)), "OptionCode(0x2a)");
        assert_eq!(format!("{:?}", Command::BLOCK_STATUS), "BLOCK_STATUS");
        assert_eq!(format!("{:?}", CommandFlags(0)), "0x0");
        assert_eq!(
            format!("{:?}", CommandFlags::FUA | CommandFlags(0x100)),
            "FUA|0x100"
        );
    }

    #[test]
    fn flag_sets_report_bits_outside_an_allowed_set() {
        let sent = CommandFlags::FUA | CommandFlags::NO_HOLE;
        assert!(sent.contains(CommandFlags::FUA));
        assert_eq!(sent.outside(CommandFlags::FUA), CommandFlags::NO_HOLE);
        assert!(sent.outside(sent).is_empty());
    }

    #[test]
    fn magics_spell_what_the_protocol_says() {
        assert_eq!(&NBD_MAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }
}
