//! The two `pgoutput` messages the logical event source reads: Relation
//! (which column is where) and Insert (a new row of the event log), in
//! protocol version 1, text format. Begin, Commit and logical messages are
//! decoded by `pgwire-replication`; everything else is skipped.

use std::collections::HashMap;

use uuid::Uuid;

use crate::event::{Event, EventKind};

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("pgoutput {0}: message truncated")]
    Truncated(&'static str),
    #[error("pgoutput: a column of {0} is not valid UTF-8")]
    NotUtf8(&'static str),
    #[error("pgoutput: insert into relation {0} before its Relation message")]
    UnknownRelation(u32),
    #[error("pgoutput: windflow_events has no column {0}")]
    MissingColumn(&'static str),
    #[error("pgoutput: column {column} of event {id:?} is {problem}")]
    BadValue { column: &'static str, id: Option<i64>, problem: &'static str },
}

/// Positions of the columns an [`Event`] needs in `windflow_events` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    id: usize,
    kind: usize,
    deployment_id: usize,
    user_id: usize,
    organization_id: usize,
    data: usize,
}

/// What one pgoutput message means to us.
#[derive(Debug)]
pub enum Decoded {
    Event(Event),
    /// An event of a type this build does not know; the row's id.
    UnknownKind(i64),
    /// Relation messages, other tables, and message types we do not read.
    Nothing,
}

/// Decodes a stream's messages; remembers the relations it was told about
/// (pgoutput sends each once per session, before its first row).
#[derive(Debug, Default)]
pub struct Decoder {
    /// Relation oid → layout, for `windflow_events` only; other published
    /// relations map to None.
    relations: HashMap<u32, Option<Layout>>,
}

impl Decoder {
    pub fn decode(&mut self, message: &[u8]) -> Result<Decoded, DecodeError> {
        let mut reader = Reader { rest: message, what: "message" };
        match reader.u8()? {
            b'R' => {
                self.relation(&mut Reader { rest: reader.rest, what: "Relation" })?;
                Ok(Decoded::Nothing)
            }
            b'I' => self.insert(&mut Reader { rest: reader.rest, what: "Insert" }),
            _ => Ok(Decoded::Nothing),
        }
    }

    fn relation(&mut self, reader: &mut Reader<'_>) -> Result<(), DecodeError> {
        let oid = reader.u32()?;
        let _namespace = reader.cstr()?;
        let name = reader.cstr()?;
        let _replica_identity = reader.u8()?;
        let count = reader.u16()?;
        let mut names = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let _flags = reader.u8()?;
            names.push(reader.cstr()?);
            let _type_oid = reader.u32()?;
            let _type_modifier = reader.u32()?;
        }
        let layout = if name == "windflow_events" {
            let at = |column: &'static str| {
                names.iter().position(|n| *n == column).ok_or(DecodeError::MissingColumn(column))
            };
            Some(Layout {
                id: at("id")?,
                kind: at("type")?,
                deployment_id: at("deployment_id")?,
                user_id: at("user_id")?,
                organization_id: at("organization_id")?,
                data: at("data")?,
            })
        } else {
            None
        };
        self.relations.insert(oid, layout);
        Ok(())
    }

    fn insert(&self, reader: &mut Reader<'_>) -> Result<Decoded, DecodeError> {
        let oid = reader.u32()?;
        let Some(layout) = self.relations.get(&oid).ok_or(DecodeError::UnknownRelation(oid))? else {
            return Ok(Decoded::Nothing);
        };
        let _new_tuple = reader.u8()?;
        let count = reader.u16()?;
        let mut values: Vec<Option<&str>> = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            values.push(match reader.u8()? {
                b't' => {
                    let len = reader.u32()? as usize;
                    let bytes = reader.take(len)?;
                    Some(std::str::from_utf8(bytes).map_err(|_| DecodeError::NotUtf8("windflow_events"))?)
                }
                // 'n' NULL; 'u' (unchanged TOAST) only occurs in updates.
                _ => None,
            });
        }
        let value = |at: usize| values.get(at).copied().flatten();
        let id = value(layout.id).and_then(|v| v.parse::<i64>().ok());
        let bad = |column, problem| DecodeError::BadValue { column, id, problem };
        let id = id.ok_or(bad("id", "missing or not an integer"))?;
        let uuid = |column, at| -> Result<Option<Uuid>, DecodeError> {
            value(at).map(|v| Uuid::parse_str(v).map_err(|_| bad(column, "not a uuid"))).transpose()
        };
        let kind = value(layout.kind).ok_or(bad("type", "null"))?;
        let Some(kind) = EventKind::parse(kind) else { return Ok(Decoded::UnknownKind(id)) };
        let deployment_id = uuid("deployment_id", layout.deployment_id)?.ok_or(bad("deployment_id", "null"))?;
        let user_id = uuid("user_id", layout.user_id)?.ok_or(bad("user_id", "null"))?;
        let organization_id = uuid("organization_id", layout.organization_id)?;
        let data = value(layout.data).ok_or(bad("data", "null"))?;
        Ok(Decoded::Event(Event::new(id, kind, deployment_id, user_id, organization_id, data)))
    }
}

struct Reader<'a> {
    rest: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < len {
            return Err(DecodeError::Truncated(self.what));
        }
        let (head, tail) = self.rest.split_at(len);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let bytes = self.take(2)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let bytes = self.take(4)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn cstr(&mut self) -> Result<&'a str, DecodeError> {
        let end = self.rest.iter().position(|b| *b == 0).ok_or(DecodeError::Truncated(self.what))?;
        let text = std::str::from_utf8(&self.rest[..end]).map_err(|_| DecodeError::NotUtf8(self.what))?;
        self.rest = &self.rest[end + 1..];
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COLUMNS: [&str; 8] =
        ["id", "xid", "type", "deployment_id", "user_id", "organization_id", "data", "created_at"];

    fn relation(oid: u32, name: &str, columns: &[&str]) -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend(oid.to_be_bytes());
        m.extend(b"public\0");
        m.extend(name.as_bytes());
        m.push(0);
        m.push(b'd');
        m.extend((columns.len() as u16).to_be_bytes());
        for column in columns {
            m.push(0);
            m.extend(column.as_bytes());
            m.push(0);
            m.extend(25u32.to_be_bytes());
            m.extend((-1i32).to_be_bytes());
        }
        m
    }

    fn insert(oid: u32, values: &[Option<&str>]) -> Vec<u8> {
        let mut m = vec![b'I'];
        m.extend(oid.to_be_bytes());
        m.push(b'N');
        m.extend((values.len() as u16).to_be_bytes());
        for value in values {
            match value {
                Some(v) => {
                    m.push(b't');
                    m.extend((v.len() as u32).to_be_bytes());
                    m.extend(v.as_bytes());
                }
                None => m.push(b'n'),
            }
        }
        m
    }

    #[test]
    fn an_insert_into_the_event_log_becomes_its_event() {
        let (deployment, owner) = (Uuid::new_v4(), Uuid::new_v4());
        let mut decoder = Decoder::default();
        assert!(matches!(decoder.decode(&relation(7, "windflow_events", &COLUMNS)).unwrap(), Decoded::Nothing));
        let (d, o) = (deployment.to_string(), owner.to_string());
        let row = [
            Some("42"),
            Some("900"),
            Some("DEPLOYMENT_PROGRESS"),
            Some(&*d),
            Some(&*o),
            None,
            Some(r#"{"progress": 5}"#),
            Some("2026-01-01"),
        ];
        let Decoded::Event(event) = decoder.decode(&insert(7, &row)).unwrap() else { panic!("not an event") };
        assert_eq!(
            (event.id, event.kind, event.deployment_id, event.owner),
            (42, EventKind::Progress, deployment, owner)
        );
        assert_eq!(event.organization_id, None);
        assert_eq!(event.frame.as_str(), r#"{"type":"DEPLOYMENT_PROGRESS","event_id":42,"data":{"progress":5}}"#);
    }

    #[test]
    fn columns_are_found_by_name_not_position() {
        let mut reordered = COLUMNS;
        reordered.swap(0, 6);
        let mut decoder = Decoder::default();
        decoder.decode(&relation(7, "windflow_events", &reordered)).unwrap();
        let (d, o) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
        let row = [Some("{}"), None, Some("DEPLOYMENT_LOGS_UPDATE"), Some(&*d), Some(&*o), None, Some("9"), None];
        let Decoded::Event(event) = decoder.decode(&insert(7, &row)).unwrap() else { panic!("not an event") };
        assert_eq!(event.id, 9);
    }

    #[test]
    fn rows_of_other_tables_and_unknown_types_are_not_events() {
        let mut decoder = Decoder::default();
        decoder.decode(&relation(7, "windflow_events", &COLUMNS)).unwrap();
        decoder.decode(&relation(8, "something_else", &["id"])).unwrap();
        assert!(matches!(decoder.decode(&insert(8, &[Some("1")])).unwrap(), Decoded::Nothing));
        let (d, o) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
        let row = [Some("3"), None, Some("NEW_KIND"), Some(&*d), Some(&*o), None, Some("{}"), None];
        assert!(matches!(decoder.decode(&insert(7, &row)).unwrap(), Decoded::UnknownKind(3)));
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let mut decoder = Decoder::default();
        assert!(matches!(decoder.decode(&insert(7, &[])), Err(DecodeError::UnknownRelation(7))));
        let full = relation(7, "windflow_events", &COLUMNS);
        for cut in 1..full.len() {
            assert!(decoder.decode(&full[..cut]).is_err(), "cut at {cut}");
        }
        assert!(matches!(
            decoder.decode(&relation(9, "windflow_events", &["id"])),
            Err(DecodeError::MissingColumn("type"))
        ));
    }
}
