//! The JSON metadata area (LUKS2 specification, section 3 "JSON area"):
//! its encoding on disk, the checks that make it a LUKS2 header cryptsetup
//! accepts, and typed views of the parts nbdcrypt uses.
//!
//! The metadata is held as a [`serde_json::Value`] so that whatever we do not
//! know (keyslots added by `cryptsetup luksAddKey`, foreign tokens, fields of
//! later versions) is written back unchanged.

use serde_json::{Map, Value};

use super::HeaderError;

/// The cipher of our data segment (dm-crypt's name: AES in XTS mode, IV =
/// 64-bit little-endian sector number).
pub(super) const CIPHER: &str = "aes-xts-plain64";
/// Keyslot areas end at most this far into the device (cryptsetup's
/// `LUKS2_MAX_KEYSLOTS_SIZE`).
pub(super) const MAX_KEYSLOTS_SIZE: u64 = 128 << 20;

/// The parts of the data segment nbdcrypt uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct CryptSegment {
    pub offset: u64,
    pub size: u64,
    pub sector_size: u32,
}

/// Lays out the JSON text in an area of `area_len` bytes: the text, then
/// zeros, with at least one zero (cryptsetup's reader requires the NUL).
pub(super) fn encode_area(metadata: &Value, area_len: usize) -> Result<Vec<u8>, HeaderError> {
    let text = serde_json::to_vec(metadata).expect("a serde_json::Value always serializes");
    if text.len() >= area_len {
        return Err(HeaderError::JsonTooLarge {
            len: text.len(),
            area: area_len,
        });
    }
    let mut area = text;
    area.resize(area_len, 0);
    Ok(area)
}

/// Parses a JSON area the way cryptsetup does (`parse_and_validate_json`):
/// one object starting at the first byte, followed only by zeros, then
/// checks it is well-formed LUKS2 metadata. The reason says what is wrong.
pub(super) fn decode_area(area: &[u8]) -> Result<Value, String> {
    if area.first() != Some(&b'{') {
        return Err("the area does not start with '{'".into());
    }
    let mut stream = serde_json::Deserializer::from_slice(area).into_iter::<Value>();
    let value = match stream.next() {
        Some(Ok(v)) => v,
        Some(Err(e)) => return Err(format!("not JSON: {e}")),
        None => return Err("empty".into()),
    };
    let end = stream.byte_offset();
    if end >= area.len() {
        return Err("no zero byte after the JSON text".into());
    }
    if area[end..].iter().any(|&b| b != 0) {
        return Err(format!(
            "non-zero bytes after the JSON text (from byte {end})"
        ));
    }
    validate(&value, area.len() as u64)?;
    Ok(value)
}

/// The structural rules of the specification, as cryptsetup enforces them
/// (`LUKS2_hdr_validate`): the five sections, numbered object ids, the fields
/// every keyslot, token, segment and digest must have, references that point
/// at existing objects, and a `config` that agrees with the binary header.
fn validate(v: &Value, json_area_len: u64) -> Result<(), String> {
    let root = v.as_object().ok_or("the top level is not an object")?;
    let section = |name: &str| -> Result<&Map<String, Value>, String> {
        let s = root.get(name).and_then(Value::as_object);
        let s = s.ok_or_else(|| format!("\"{name}\" is missing or not an object"))?;
        if let Some(id) = s.keys().find(|k| !is_number(k)) {
            return Err(format!("id {id:?} in \"{name}\" is not a number"));
        }
        Ok(s)
    };
    let keyslots = section("keyslots")?;
    let tokens = section("tokens")?;
    let segments = section("segments")?;
    let digests = section("digests")?;
    let config = root.get("config").filter(|c| c.is_object());
    let config = config.ok_or("\"config\" is missing or not an object")?;

    for (id, k) in keyslots {
        need_str(k, "keyslot", id, "type")?;
        k.get("key_size")
            .and_then(Value::as_u64)
            .filter(|&n| u32::try_from(n).is_ok())
            .ok_or(format!(
                "keyslot {id}: \"key_size\" is not a 32-bit unsigned integer"
            ))?;
    }
    for (id, t) in tokens {
        need_str(t, "token", id, "type")?;
        refs(t, "token", id, "keyslots", keyslots)?;
    }
    for (id, d) in digests {
        need_str(d, "digest", id, "type")?;
        refs(d, "digest", id, "keyslots", keyslots)?;
        refs(d, "digest", id, "segments", segments)?;
    }
    if segments.is_empty() {
        return Err("no segment".into());
    }
    for (id, s) in segments {
        need_str(s, "segment", id, "type")?;
        number(
            need_str(s, "segment", id, "offset")?,
            "segment",
            id,
            "offset",
        )?;
        let size = need_str(s, "segment", id, "size")?;
        if size != "dynamic" && number(size, "segment", id, "size")? == 0 {
            return Err(format!("segment {id}: \"size\" is zero"));
        }
    }
    let json_size = number(
        need_str(config, "config", "", "json_size")?,
        "config",
        "",
        "json_size",
    )?;
    if json_size != json_area_len {
        return Err(format!(
            "config json_size {json_size} differs from the {json_area_len}-byte area of the binary header"
        ));
    }
    let keyslots_size = need_str(config, "config", "", "keyslots_size")?;
    let keyslots_size = number(keyslots_size, "config", "", "keyslots_size")?;
    if !keyslots_size.is_multiple_of(4096) || keyslots_size > MAX_KEYSLOTS_SIZE {
        return Err(format!(
            "config keyslots_size {keyslots_size} is not a multiple of 4096 up to {MAX_KEYSLOTS_SIZE}"
        ));
    }
    // The keyslots area lies between the second copy and the data (offset 0
    // means a detached header, where no data follows the metadata).
    let metadata_size = json_area_len + super::binary::BINARY_HEADER_LEN as u64;
    let first_data = segments
        .values()
        .filter_map(|s| s["offset"].as_str()?.parse::<u64>().ok())
        .min();
    if let Some(first) = first_data.filter(|&o| o != 0)
        && first
            .checked_sub(keyslots_size)
            .is_none_or(|room| room < 2 * metadata_size)
    {
        return Err(format!(
            "keyslots_size {keyslots_size} does not fit between the two metadata copies and the data at {first}"
        ));
    }
    Ok(())
}

/// The segment nbdcrypt serves: exactly one, a fixed-size `crypt` segment of
/// `aes-xts-plain64` with 512- or 4096-byte sectors and no IV shift.
pub(super) fn crypt_segment(v: &Value) -> Result<CryptSegment, HeaderError> {
    let unsupported = |why: String| HeaderError::UnsupportedSegment(why);
    let segments = &v["segments"];
    let segments = segments
        .as_object()
        .expect("validated when the area was read");
    let [(id, seg)] = segments.iter().collect::<Vec<_>>()[..] else {
        return Err(unsupported(format!(
            "{} segments; nbdcrypt serves exactly one",
            segments.len()
        )));
    };
    let kind = seg["type"].as_str().unwrap_or_default();
    if kind != "crypt" {
        return Err(unsupported(format!(
            "segment {id} has type {kind:?}, not \"crypt\""
        )));
    }
    let field = |name: &str| need_str(seg, "segment", id, name).map_err(HeaderError::Malformed);
    let cipher = field("encryption")?;
    if cipher != CIPHER {
        return Err(unsupported(format!(
            "segment {id} uses {cipher:?}; nbdcrypt supports only {CIPHER}"
        )));
    }
    if seg.get("integrity").is_some() {
        return Err(unsupported(format!(
            "segment {id} has dm-integrity; nbdcrypt does not"
        )));
    }
    if let Some(flags) = seg
        .get("flags")
        .and_then(Value::as_array)
        .filter(|f| !f.is_empty())
    {
        return Err(unsupported(format!("segment {id} has flags {flags:?}")));
    }
    let num =
        |name: &str| number(field(name)?, "segment", id, name).map_err(HeaderError::Malformed);
    if num("iv_tweak")? != 0 {
        return Err(unsupported(format!("segment {id} has a non-zero iv_tweak")));
    }
    if field("size")? == "dynamic" {
        return Err(unsupported(format!(
            "segment {id} has a dynamic size (to the end of the device); nbdcrypt volumes record their size"
        )));
    }
    let sector_size = match seg["sector_size"].as_u64() {
        Some(n @ (512 | 4096)) => n as u32,
        other => {
            return Err(unsupported(format!(
                "segment {id} has sector_size {other:?}; nbdcrypt supports 512 and 4096"
            )));
        }
    };
    let offset = num("offset")?;
    let size = num("size")?;
    if !offset.is_multiple_of(u64::from(sector_size))
        || !size.is_multiple_of(u64::from(sector_size))
    {
        return Err(HeaderError::Malformed(format!(
            "segment {id}: offset {offset} or size {size} is not a multiple of the {sector_size}-byte sector"
        )));
    }
    if offset.checked_add(size).is_none() {
        return Err(HeaderError::Malformed(format!(
            "segment {id}: offset + size overflows"
        )));
    }
    Ok(CryptSegment {
        offset,
        size,
        sector_size,
    })
}

/// The ids of the objects in `section` (tokens, digests) whose `type` is `kind`.
pub(super) fn ids_of_type<'a>(v: &'a Value, section: &str, kind: &str) -> Vec<&'a str> {
    let mut ids: Vec<&str> = v[section]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, obj)| obj["type"] == kind)
        .map(|(id, _)| id.as_str())
        .collect();
    ids.sort_by_key(|id| id.parse::<u64>().unwrap_or(u64::MAX));
    ids
}

/// The requirements a reader must understand (`config.requirements.mandatory`,
/// e.g. `online-reencrypt`); nbdcrypt understands none.
pub(super) fn mandatory_requirements(v: &Value) -> Vec<String> {
    v["config"]["requirements"]["mandatory"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r.as_str().map_or_else(|| r.to_string(), str::to_owned))
        .collect()
}

fn is_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

/// A decimal number held in a string, as LUKS2 stores 64-bit values.
fn number(s: &str, kind: &str, id: &str, name: &str) -> Result<u64, String> {
    if !is_number(s) {
        return Err(format!(
            "{kind} {id}: \"{name}\" {s:?} is not a decimal number"
        ));
    }
    s.parse()
        .map_err(|_| format!("{kind} {id}: \"{name}\" {s} exceeds 2^64-1"))
}

fn need_str<'a>(obj: &'a Value, kind: &str, id: &str, name: &str) -> Result<&'a str, String> {
    match obj.get(name) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        _ => Err(format!(
            "{kind} {id}: \"{name}\" is missing or not a non-empty string"
        )),
    }
}

/// An array of ids that must all exist in `targets`.
fn refs(
    obj: &Value,
    kind: &str,
    id: &str,
    name: &str,
    targets: &Map<String, Value>,
) -> Result<(), String> {
    let arr = obj.get(name).and_then(Value::as_array);
    let arr = arr.ok_or_else(|| format!("{kind} {id}: \"{name}\" is missing or not an array"))?;
    for r in arr {
        match r.as_str() {
            Some(r) if targets.contains_key(r) => {}
            _ => {
                return Err(format!(
                    "{kind} {id}: \"{name}\" refers to {r}, which does not exist"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({
            "keyslots": {},
            "tokens": {"0": {"type": "nbdcrypt-kms", "keyslots": []}},
            "segments": {"0": {"type": "crypt", "offset": "16777216", "size": "1048576",
                "iv_tweak": "0", "encryption": "aes-xts-plain64", "sector_size": 4096}},
            "digests": {"0": {"type": "pbkdf2", "keyslots": [], "segments": ["0"]}},
            "config": {"json_size": "12288", "keyslots_size": "16744448"},
        })
    }

    /// An edit of the sample metadata, and the words the error must contain.
    type Case = (fn(&mut Value), &'static str);

    fn area(v: &Value) -> Vec<u8> {
        encode_area(v, 12288).unwrap()
    }

    #[test]
    fn area_round_trip_and_padding() {
        let a = area(&sample());
        assert_eq!(a.len(), 12288);
        assert_eq!(a[0], b'{');
        assert_eq!(*a.last().unwrap(), 0);
        assert_eq!(decode_area(&a).unwrap(), sample());
    }

    #[test]
    fn area_must_hold_only_the_object_and_zeros() {
        let mut a = area(&sample());
        let end = a.iter().position(|&b| b == 0).unwrap();
        a[end] = b' ';
        assert!(decode_area(&a).unwrap_err().contains("non-zero"));
        let mut a = area(&sample());
        a.insert(0, b' ');
        a.pop();
        assert!(decode_area(&a).unwrap_err().contains("start"));
        let text = serde_json::to_vec(&sample()).unwrap();
        assert!(decode_area(&text).unwrap_err().contains("no zero byte"));
        let mut a = area(&sample());
        a[end - 1] = 0;
        assert!(decode_area(&a).unwrap_err().contains("not JSON"));
    }

    #[test]
    fn too_large_metadata_is_refused() {
        let mut v = sample();
        v["tokens"]["0"]["pad"] = "x".repeat(12288).into();
        assert!(matches!(
            encode_area(&v, 12288),
            Err(HeaderError::JsonTooLarge { area: 12288, .. })
        ));
    }

    #[test]
    fn structural_errors_are_named() {
        let cases: Vec<Case> = vec![
            (
                |v| (v["segments"], v["digests"]) = (json!({}), json!({})),
                "no segment",
            ),
            (
                |v| drop(v.as_object_mut().unwrap().remove("digests")),
                "\"digests\" is missing",
            ),
            (
                |v| v["tokens"]["x"] = json!({"type": "a", "keyslots": []}),
                "id \"x\" in \"tokens\"",
            ),
            (
                |v| v["tokens"]["0"]["keyslots"] = json!(["4"]),
                "refers to \"4\"",
            ),
            (
                |v| v["digests"]["0"]["segments"] = json!(["1"]),
                "refers to \"1\"",
            ),
            (
                |v| v["segments"]["0"]["offset"] = json!("-1"),
                "not a decimal number",
            ),
            (|v| v["segments"]["0"]["size"] = json!("0"), "is zero"),
            (|v| v["config"]["json_size"] = json!("4096"), "differs"),
            (
                |v| v["config"]["keyslots_size"] = json!("100"),
                "multiple of 4096",
            ),
            (
                |v| v["keyslots"]["0"] = json!({"type": "luks2"}),
                "key_size",
            ),
            (
                |v| v["config"]["keyslots_size"] = json!("16777216"),
                "does not fit",
            ),
        ];
        for (edit, reason) in cases {
            let mut v = sample();
            edit(&mut v);
            let err = decode_area(&area(&v)).unwrap_err();
            assert!(err.contains(reason), "expected {reason:?} in {err:?}");
        }
    }

    #[test]
    fn the_crypt_segment_nbdcrypt_serves() {
        let v = sample();
        assert_eq!(
            crypt_segment(&v).unwrap(),
            CryptSegment {
                offset: 16 << 20,
                size: 1 << 20,
                sector_size: 4096
            }
        );
        let unsupported: Vec<Case> = vec![
            (|v| v["segments"]["0"]["size"] = json!("dynamic"), "dynamic"),
            (
                |v| v["segments"]["0"]["encryption"] = json!("aes-cbc-essiv:sha256"),
                "aes-cbc",
            ),
            (|v| v["segments"]["0"]["sector_size"] = json!(1024), "1024"),
            (|v| v["segments"]["0"]["iv_tweak"] = json!("8"), "iv_tweak"),
            (|v| v["segments"]["0"]["type"] = json!("linear"), "linear"),
            (
                |v| v["segments"]["1"] = v["segments"]["0"].clone(),
                "2 segments",
            ),
        ];
        for (edit, reason) in unsupported {
            let mut v = sample();
            edit(&mut v);
            match crypt_segment(&v) {
                Err(HeaderError::UnsupportedSegment(why)) => assert!(why.contains(reason), "{why}"),
                other => panic!("{reason}: {other:?}"),
            }
        }
        let mut v = sample();
        v["segments"]["0"]["size"] = json!("1000");
        assert!(matches!(crypt_segment(&v), Err(HeaderError::Malformed(_))));
    }

    #[test]
    fn ids_of_a_type_in_numeric_order() {
        let mut v = sample();
        v["tokens"]["10"] = json!({"type": "nbdcrypt-kms"});
        v["tokens"]["2"] = json!({"type": "systemd-tpm2"});
        v["tokens"]["9"] = json!({"type": "nbdcrypt-kms"});
        assert_eq!(ids_of_type(&v, "tokens", "nbdcrypt-kms"), ["0", "9", "10"]);
    }
}
