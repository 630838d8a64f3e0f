//! How a caller names a key: a key id (UUID), a key ARN, an alias name or an
//! alias ARN, with AWS's rules for which operations accept which, and AWS's
//! rules for alias names.

use uuid::Uuid;

use super::KmsError;

/// The region and account every ARN of one KMS directory carries; fixed when
/// the directory is created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    pub region: String,
    pub account: String,
}

impl Partition {
    pub fn key_arn(&self, id: Uuid) -> String {
        format!("arn:aws:kms:{}:{}:key/{id}", self.region, self.account)
    }

    pub fn alias_arn(&self, alias: &str) -> String {
        format!("arn:aws:kms:{}:{}:{alias}", self.region, self.account)
    }

    /// Parses a key identifier. `allow_alias` is false for the operations
    /// that change a key (AWS: "specify the key ID or key ARN").
    pub fn parse<'a>(&self, given: &'a str, allow_alias: bool) -> Result<KeyRef<'a>, KmsError> {
        let not_found = || KmsError::NotFound {
            key: given.to_owned(),
        };
        let (resource, via_arn) = match given.strip_prefix("arn:") {
            Some(rest) => {
                let prefix = format!("aws:kms:{}:{}:", self.region, self.account);
                (rest.strip_prefix(&prefix).ok_or_else(not_found)?, true)
            }
            None => (given, false),
        };
        if resource.starts_with("alias/") {
            if !allow_alias {
                return Err(KmsError::Validation(format!(
                    "this operation takes a key id or key ARN, not the alias '{given}'; find the key id with `nbdcrypt kms describe-key {given}`"
                )));
            }
            return Ok(KeyRef::Alias(resource));
        }
        let id = match (via_arn, resource.strip_prefix("key/")) {
            (true, Some(id)) => id,
            (false, None) => resource,
            _ => return Err(not_found()),
        };
        // Only the hyphenated lowercase form, the one AWS prints, names a key.
        let uuid = Uuid::parse_str(id).map_err(|_| not_found())?;
        if uuid.hyphenated().to_string() != id {
            return Err(not_found());
        }
        Ok(KeyRef::Id(uuid))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyRef<'a> {
    Id(Uuid),
    /// The alias name, `alias/…`.
    Alias(&'a str),
}

/// Checks a new alias name against AWS's rules: `alias/` then 1 to 250 of
/// letters, digits, `/`, `_` and `-`; `alias/aws/` is reserved for AWS
/// managed keys.
pub fn validate_alias_name(alias: &str) -> Result<(), KmsError> {
    let bad = |why: &str| {
        Err(KmsError::Validation(format!(
            "alias name '{alias}' {why}; an alias is alias/ followed by letters, digits, '/', '_' or '-', such as alias/orders-db"
        )))
    };
    let Some(name) = alias.strip_prefix("alias/") else {
        return bad("does not begin with alias/");
    };
    if name.is_empty() || alias.len() > 256 {
        return bad("must be 7 to 256 characters long");
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'/' | b'_' | b'-'))
    {
        return bad("contains a character that is not allowed");
    }
    if alias.starts_with("alias/aws/") {
        return bad("uses the prefix alias/aws/, which AWS reserves for its managed keys");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partition() -> Partition {
        Partition {
            region: "local-1".into(),
            account: "111122223333".into(),
        }
    }

    #[test]
    fn ids_arns_and_aliases() {
        let p = partition();
        let id = Uuid::new_v4();
        assert_eq!(p.parse(&id.to_string(), false).unwrap(), KeyRef::Id(id));
        assert_eq!(p.parse(&p.key_arn(id), false).unwrap(), KeyRef::Id(id));
        assert_eq!(p.parse("alias/x", true).unwrap(), KeyRef::Alias("alias/x"));
        assert_eq!(
            p.parse(&p.alias_arn("alias/x"), true).unwrap(),
            KeyRef::Alias("alias/x")
        );
    }

    #[test]
    fn changing_verbs_refuse_aliases() {
        let p = partition();
        let err = p.parse("alias/x", false).unwrap_err();
        assert_eq!(err.aws_code(), "ValidationException");
        assert!(err.to_string().contains("describe-key alias/x"), "{err}");
    }

    #[test]
    fn foreign_or_malformed_names_are_not_found() {
        let p = partition();
        let id = Uuid::new_v4();
        let other = Partition {
            region: "us-east-1".into(),
            account: "111122223333".into(),
        };
        for bad in [
            other.key_arn(id),
            format!("arn:aws:kms:local-1:111122223333:{id}"),
            format!("key/{id}"),
            id.to_string().to_uppercase(),
            id.simple().to_string(),
            "nonsense".to_owned(),
        ] {
            let err = p.parse(&bad, true).unwrap_err();
            assert_eq!(err.aws_code(), "NotFoundException", "{bad}");
        }
    }

    #[test]
    fn alias_rules() {
        for good in ["alias/orders-db", "alias/a/b_c-D9"] {
            validate_alias_name(good).unwrap();
        }
        let long = format!("alias/{}", "a".repeat(251));
        for bad in [
            "orders",
            "alias/",
            "alias/aws/ebs",
            "alias/has space",
            "alias/é",
            long.as_str(),
        ] {
            let err = validate_alias_name(bad).unwrap_err();
            assert_eq!(err.aws_code(), "ValidationException", "{bad}");
        }
    }
}
