//! Whole-header tests against real files: round trip, each kind of damage
//! to either copy, stale copies, truncation, foreign files, and keeping the
//! metadata we do not understand.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use super::*;

const DATA_SIZE: u64 = 1 << 20;

fn token(blob: &[u8]) -> KmsToken {
    KmsToken {
        key_id: "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
            .into(),
        encryption_context: BTreeMap::from([
            ("aws:ebs:id".into(), "vol-ad8c6542".into()),
            (
                "aws:rds:db-id".into(),
                "db-CQYSMDPBRZ7BPMH7Y3RTDG5QY".into(),
            ),
        ]),
        ciphertext_blob: blob.to_vec(),
    }
}

fn params() -> FormatParams {
    FormatParams {
        uuid: uuid::Uuid::new_v4(),
        label: "vol-ad8c6542".into(),
        sector_size: 4096,
        data_offset: DEFAULT_DATA_OFFSET,
        data_size: DATA_SIZE,
    }
}

/// One formatted header and its key, shared: each format runs the digest's
/// 100 000 PBKDF2 iterations, slow in a debug build.
fn formatted() -> (Header, SecretBytes) {
    static ONCE: OnceLock<(Header, SecretBytes)> = OnceLock::new();
    let (h, k) = ONCE.get_or_init(|| {
        let key = SecretBytes::random(VOLUME_KEY_LEN);
        (
            Header::format(&params(), &key, &token(b"blob-1")).unwrap(),
            key,
        )
    });
    (h.clone(), k.clone())
}

/// A sparse volume file holding a freshly written header (seqid 2).
fn volume() -> (File, Header, SecretBytes) {
    let (mut header, key) = formatted();
    let file = tempfile::tempfile().unwrap();
    file.set_len(DEFAULT_DATA_OFFSET + DATA_SIZE).unwrap();
    header.write_to(&file).unwrap();
    (file, header, key)
}

fn copy_offset(copy: HeaderCopy) -> u64 {
    match copy {
        HeaderCopy::Primary => 0,
        HeaderCopy::Secondary => HDR_SIZE,
    }
}

fn read_bytes(file: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).unwrap();
    buf
}

fn flip(file: &File, offset: u64) {
    let mut b = read_bytes(file, offset, 1);
    b[0] ^= 0x40;
    file.write_all_at(&b, offset).unwrap();
}

/// Writes `copy` with `json` as its JSON text and a correct checksum, as a
/// buggy or hostile writer would.
fn write_copy_with_json(file: &File, header: &Header, copy: HeaderCopy, json: &[u8]) {
    let mut area = json.to_vec();
    area.resize(HDR_SIZE as usize - BINARY_HEADER_LEN, 0);
    let bytes = header.binary.encode(copy, &[7; 64], &area);
    file.write_all_at(&bytes, copy_offset(copy)).unwrap();
}

fn write_both_with_metadata(file: &File, header: &Header, metadata: &Value) {
    let json = serde_json::to_vec(metadata).unwrap();
    write_copy_with_json(file, header, HeaderCopy::Primary, &json);
    write_copy_with_json(file, header, HeaderCopy::Secondary, &json);
}

fn assert_same_volume(a: &Header, b: &Header) {
    assert_eq!(a.uuid(), b.uuid());
    assert_eq!(a.label(), b.label());
    assert_eq!(a.metadata(), b.metadata());
    assert_eq!(a.kms_token().unwrap(), b.kms_token().unwrap());
}

#[test]
fn round_trip() {
    let (file, written, key) = volume();
    let read = Header::read_from(&file).unwrap();
    assert_eq!(read.seqid(), 2);
    assert_eq!(read.damage(), None);
    assert_same_volume(&read, &written);
    assert_eq!(read.label(), "vol-ad8c6542");
    assert_eq!(read.subsystem(), "nbdcrypt");
    assert_eq!(read.sector_size(), 4096);
    assert_eq!(read.data_offset(), DEFAULT_DATA_OFFSET);
    assert_eq!(read.data_size(), DATA_SIZE);
    assert_eq!(read.cipher(), "aes-xts-plain64");
    assert_eq!(read.hdr_size(), HDR_SIZE);
    assert_eq!(read.kms_token().unwrap(), token(b"blob-1"));
    assert_eq!(read.metadata()["keyslots"], json!({}));
    assert_eq!(
        read.metadata()["config"]["keyslots_size"],
        json!((16 << 20) - 32768).to_string()
    );
    read.verify_volume_key(&key).unwrap();
    assert!(matches!(
        read.verify_volume_key(&SecretBytes::random(VOLUME_KEY_LEN)),
        Err(HeaderError::WrongVolumeKey)
    ));
    assert!(matches!(
        read.verify_volume_key(&SecretBytes::copy_from(&key.expose()[..32])),
        Err(HeaderError::WrongVolumeKey)
    ));
    assert_eq!(&read_bytes(&file, 0, 6), b"LUKS\xba\xbe");
    assert_eq!(&read_bytes(&file, HDR_SIZE, 6), b"SKUL\xba\xbe");
}

#[test]
fn a_damaged_copy_is_detected_and_the_other_used() {
    type Damage = fn(&File, &Header, HeaderCopy);
    type Expected = fn(&CopyFault) -> bool;
    let cases: [(&str, Damage, Expected); 4] = [
        (
            "magic",
            |f, _, c| flip(f, copy_offset(c)),
            |f| *f == CopyFault::NoMagic,
        ),
        (
            "checksum",
            |f, _, c| flip(f, copy_offset(c) + 450),
            |f| *f == CopyFault::Checksum,
        ),
        (
            "JSON byte",
            |f, _, c| flip(f, copy_offset(c) + 4096 + 20),
            |f| *f == CopyFault::Checksum,
        ),
        (
            "JSON with a valid checksum",
            |f, h, c| write_copy_with_json(f, h, c, br#"{"keyslots":{},"tokens":"#),
            |f| matches!(f, CopyFault::Malformed(why) if why.contains("not JSON")),
        ),
    ];
    for (what, damage, expected) in cases {
        for copy in [HeaderCopy::Primary, HeaderCopy::Secondary] {
            let (file, written, _) = volume();
            damage(&file, &written, copy);
            let mut read =
                Header::read_from(&file).unwrap_or_else(|e| panic!("{what} {copy}: {e}"));
            let d = read
                .damage()
                .unwrap_or_else(|| panic!("{what} {copy}: damage not reported"));
            assert_eq!(d.copy, copy, "{what}");
            assert!(expected(&d.fault), "{what} {copy}: {:?}", d.fault);
            assert_same_volume(&read, &written);

            // The next update repairs it.
            read.write_to(&file).unwrap();
            let repaired = Header::read_from(&file).unwrap();
            assert_eq!(repaired.damage(), None, "{what} {copy}");
            assert_eq!(repaired.seqid(), 3);
        }
    }
}

#[test]
fn both_copies_damaged() {
    let (file, _, _) = volume();
    flip(&file, 450);
    flip(&file, HDR_SIZE);
    match Header::read_from(&file) {
        Err(HeaderError::Damaged { primary, secondary }) => {
            assert_eq!(primary, CopyFault::Checksum);
            assert_eq!(secondary, CopyFault::NoMagic);
        }
        other => panic!("{other:?}"),
    }

    let (file, header, _) = volume();
    write_copy_with_json(&file, &header, HeaderCopy::Primary, b"{}");
    write_copy_with_json(&file, &header, HeaderCopy::Secondary, b"{}");
    assert!(
        matches!(Header::read_from(&file), Err(HeaderError::Malformed(why)) if why.contains("keyslots"))
    );
}

#[test]
fn the_newer_copy_wins() {
    let (file, mut header, _) = volume();
    let old_primary = read_bytes(&file, 0, HDR_SIZE as usize);
    let old_secondary = read_bytes(&file, HDR_SIZE, HDR_SIZE as usize);
    header.set_kms_token(&token(b"blob-2"));
    header.write_to(&file).unwrap();
    let new_primary = read_bytes(&file, 0, HDR_SIZE as usize);

    // As after a crash between the two writes.
    file.write_all_at(&old_secondary, HDR_SIZE).unwrap();
    let read = Header::read_from(&file).unwrap();
    assert_eq!(read.seqid(), 3);
    assert_eq!(read.kms_token().unwrap(), token(b"blob-2"));
    let stale = CopyFault::Stale {
        seqid: 2,
        current: 3,
    };
    assert_eq!(
        read.damage(),
        Some(&CopyDamage {
            copy: HeaderCopy::Secondary,
            fault: stale.clone()
        })
    );

    // The newer copy wins even when it is the secondary.
    header.write_to(&file).unwrap();
    file.write_all_at(&old_primary, 0).unwrap();
    let read = Header::read_from(&file).unwrap();
    assert_eq!(read.seqid(), 4);
    assert_eq!(read.kms_token().unwrap(), token(b"blob-2"));
    let stale = CopyFault::Stale {
        seqid: 2,
        current: 4,
    };
    assert_eq!(
        read.damage(),
        Some(&CopyDamage {
            copy: HeaderCopy::Primary,
            fault: stale
        })
    );

    // Equal seqids: both copies are current.
    file.write_all_at(&new_primary, 0).unwrap();
    header.binary.seqid = 3;
    file.write_all_at(
        &header.binary.encode(
            HeaderCopy::Secondary,
            &[1; 64],
            &read_bytes(&file, 4096, 12288),
        ),
        HDR_SIZE,
    )
    .unwrap();
    assert_eq!(Header::read_from(&file).unwrap().damage(), None);
}

#[test]
fn truncated_volumes() {
    let (file, _, _) = volume();
    let end = DEFAULT_DATA_OFFSET + DATA_SIZE;
    file.set_len(end - 4096).unwrap();
    match Header::read_from(&file) {
        Err(HeaderError::Truncated { len, needed }) => assert_eq!((len, needed), (end - 4096, end)),
        other => panic!("{other:?}"),
    }
    // Cut inside the secondary copy: the primary is read, the data is missing.
    file.set_len(HDR_SIZE + 100).unwrap();
    assert!(
        matches!(Header::read_from(&file), Err(HeaderError::Truncated { needed, .. }) if needed == end)
    );
    // Cut inside the primary copy.
    file.set_len(5000).unwrap();
    assert!(matches!(
        Header::read_from(&file),
        Err(HeaderError::Truncated {
            needed: HDR_SIZE,
            ..
        })
    ));
    file.set_len(100).unwrap();
    assert!(matches!(
        Header::read_from(&file),
        Err(HeaderError::Truncated { needed: 4096, .. })
    ));
}

#[test]
fn files_that_are_not_luks() {
    let file = tempfile::tempfile().unwrap();
    assert!(matches!(
        Header::read_from(&file),
        Err(HeaderError::NotLuks)
    ));
    file.set_len(DEFAULT_DATA_OFFSET).unwrap();
    assert!(matches!(
        Header::read_from(&file),
        Err(HeaderError::NotLuks)
    ));
    file.write_all_at(&b"#!/bin/sh\necho hello\n".repeat(2000), 0)
        .unwrap();
    assert!(matches!(
        Header::read_from(&file),
        Err(HeaderError::NotLuks)
    ));

    // A LUKS1 header: same magic, version 1.
    let mut luks1 = vec![0u8; 4096];
    luks1[..8].copy_from_slice(b"LUKS\xba\xbe\x00\x01");
    file.write_all_at(&luks1, 0).unwrap();
    assert!(matches!(
        Header::read_from(&file),
        Err(HeaderError::UnsupportedVersion(1))
    ));

    let err = HeaderError::NotLuks.to_string();
    assert!(err.contains("not a LUKS volume"), "{err}");
}

#[test]
fn luks2_headers_nbdcrypt_cannot_serve() {
    type Edit = fn(&mut Value);
    type Expected = fn(&HeaderError) -> bool;
    let cases: [(Edit, Expected); 6] = [
        (
            |m| m["tokens"] = json!({}),
            |e| {
                matches!(e, HeaderError::NoKmsToken)
                    && e.to_string().contains("cryptsetup luksFormat")
            },
        ),
        (
            |m| m["tokens"]["3"] = m["tokens"]["0"].clone(),
            |e| matches!(e, HeaderError::Malformed(w) if w.contains("2 nbdcrypt-kms tokens")),
        ),
        (
            |m| m["segments"]["0"]["size"] = json!("dynamic"),
            |e| matches!(e, HeaderError::UnsupportedSegment(w) if w.contains("dynamic")),
        ),
        (
            |m| m["config"]["requirements"] = json!({"mandatory": ["online-reencrypt-v2"]}),
            |e| matches!(e, HeaderError::UnsupportedRequirements(r) if r == &["online-reencrypt-v2"]),
        ),
        (
            |m| m["digests"]["0"]["segments"] = json!([]),
            |e| matches!(e, HeaderError::Malformed(w) if w.contains("no digest")),
        ),
        (
            |m| m["tokens"]["0"]["ciphertext_blob"] = json!(7),
            |e| matches!(e, HeaderError::Malformed(w) if w.contains("ciphertext_blob")),
        ),
    ];
    for (edit, expected) in cases {
        let (file, header, _) = volume();
        let mut m = header.metadata().clone();
        edit(&mut m);
        write_both_with_metadata(&file, &header, &m);
        let err = Header::read_from(&file).unwrap_err();
        assert!(expected(&err), "{err:?}");
    }
}

#[test]
fn unknown_metadata_survives_updates() {
    let (file, header, key) = volume();
    let mut m = header.metadata().clone();
    // What `cryptsetup luksAddKey` and `systemd-cryptenroll` leave behind.
    m["keyslots"]["1"] = json!({
        "type": "luks2", "key_size": 64,
        "af": {"type": "luks1", "stripes": 4000, "hash": "sha256"},
        "area": {"type": "raw", "offset": "32768", "size": "258048", "encryption": "aes-xts-plain64", "key_size": 64},
        "kdf": {"type": "pbkdf2", "hash": "sha256", "iterations": 1000, "salt": "AAAA"},
    });
    m["digests"]["0"]["keyslots"] = json!(["1"]);
    m["tokens"]["1"] =
        json!({"type": "systemd-fido2", "keyslots": ["1"], "fido2-credential": "xyz"});
    m["tokens"]["0"]["future-field"] = json!({"a": [1, 2]});
    m["config"]["flags"] = json!(["allow-discards"]);
    write_both_with_metadata(&file, &header, &m);

    let mut read = Header::read_from(&file).unwrap();
    assert_eq!(read.metadata(), &m);
    read.set_kms_token(&token(b"blob-3"));
    read.write_to(&file).unwrap();

    let again = Header::read_from(&file).unwrap();
    assert_eq!(again.kms_token().unwrap(), token(b"blob-3"));
    let mut expected = m.clone();
    expected["tokens"]["0"]["ciphertext_blob"] = json!("YmxvYi0z");
    assert_eq!(again.metadata(), &expected);
    again.verify_volume_key(&key).unwrap();
}

#[test]
fn format_checks_its_parameters() {
    let key = SecretBytes::random(VOLUME_KEY_LEN);
    type Edit = fn(&mut FormatParams);
    let cases: [(Edit, &str); 6] = [
        (|p| p.sector_size = 1024, "sector size"),
        (|p| p.data_size = 4096 * 3 + 512, "multiple"),
        (|p| p.data_size = 0, "multiple"),
        (|p| p.data_offset = 16384, "data offset"),
        (|p| p.data_offset = DEFAULT_DATA_OFFSET + 512, "data offset"),
        (|p| p.label = "v".repeat(48), "label"),
    ];
    for (edit, reason) in cases {
        let mut p = params();
        edit(&mut p);
        match Header::format(&p, &key, &token(b"b")) {
            Err(HeaderError::InvalidParams(why)) => assert!(why.contains(reason), "{why}"),
            other => panic!("{reason}: {other:?}"),
        }
    }
    for bad_key in [SecretBytes::random(32), SecretBytes::copy_from(&[9; 64])] {
        assert!(matches!(
            Header::format(&params(), &bad_key, &token(b"b")),
            Err(HeaderError::InvalidParams(_))
        ));
    }
    let huge = token(&[0; 10_000]);
    assert!(matches!(
        Header::format(&params(), &key, &huge),
        Err(HeaderError::JsonTooLarge { area: 12288, .. })
    ));
}

#[test]
fn format_with_512_byte_sectors_and_a_small_keyslots_area() {
    let key = SecretBytes::random(VOLUME_KEY_LEN);
    let mut p = params();
    p.sector_size = 512;
    p.data_offset = 2 * HDR_SIZE + 4096;
    p.data_size = 512 * 3;
    let h = Header::format(&p, &key, &token(b"b")).unwrap();
    assert_eq!(h.sector_size(), 512);
    assert_eq!(h.seqid(), 1);
    assert_eq!(h.metadata()["config"]["keyslots_size"], json!("4096"));
    assert_eq!(h.metadata()["segments"]["0"]["sector_size"], json!(512));
    h.verify_volume_key(&key).unwrap();
}

#[test]
fn a_header_sharing_the_key_verifies_it_and_drops_keyslots() {
    let (mut source, key) = formatted();
    // As `cryptsetup luksAddKey` leaves it: a keyslot the digest names.
    source.metadata["keyslots"]["1"] = json!({"type": "luks2", "key_size": 64});
    source.metadata["digests"]["0"]["keyslots"] = json!(["1"]);
    let mut p = params();
    p.label = "snap-0a1b2c3d".into();
    let copy = source.format_sharing_key(&p, &token(b"blob-2")).unwrap();
    assert_eq!(copy.label(), "snap-0a1b2c3d");
    assert_ne!(copy.uuid(), source.uuid());
    assert_eq!(copy.kms_token().unwrap(), token(b"blob-2"));
    copy.verify_volume_key(&key).unwrap();
    assert_eq!(copy.metadata()["keyslots"], json!({}));
    assert_eq!(copy.metadata()["digests"]["0"]["keyslots"], json!([]));

    let file = tempfile::tempfile().unwrap();
    file.set_len(DEFAULT_DATA_OFFSET + DATA_SIZE).unwrap();
    copy.clone().write_to(&file).unwrap();
    Header::read_from(&file)
        .unwrap()
        .verify_volume_key(&key)
        .unwrap();

    let mut other = params();
    other.data_size = 2 * DATA_SIZE;
    assert!(matches!(
        source.format_sharing_key(&other, &token(b"x")),
        Err(HeaderError::InvalidParams(_))
    ));
}

#[test]
fn an_aux_token_is_written_replaced_and_read_back() {
    let (file, mut header, _key) = volume();
    let fields = |v: &str| json!({"source": v}).as_object().unwrap().clone();
    header
        .set_aux_token("nbdcrypt-snapshot", fields("a"))
        .unwrap();
    header
        .set_aux_token("nbdcrypt-snapshot", fields("b"))
        .unwrap();
    header.write_to(&file).unwrap();
    let read = Header::read_from(&file).unwrap();
    let aux = read.aux_token("nbdcrypt-snapshot").unwrap();
    assert_eq!(aux["source"], "b");
    assert_eq!(aux["keyslots"], json!([]));
    assert_eq!(read.metadata()["tokens"].as_object().unwrap().len(), 2);
    assert!(read.kms_token().is_ok());
    assert!(read.aux_token("other").is_none());
    for reserved in [TOKEN_TYPE, "luks2-keyring", ""] {
        assert!(header.set_aux_token(reserved, fields("c")).is_err());
    }
}
