//! One JSON reading as the encoder takes it: each field's scalar in the slot of its schema
//! position, borrowed from the request body wherever serde_json did not have to unescape it.
//! Ingest fills the table straight from the parser's events and reuses it from reading to
//! reading, so a reading costs no `serde_json::Value` tree, no map and no copy of a name or a
//! string that needed no unescaping. `serde_json::Value` readings are turned into the same table
//! ([`StreamSchema::encode_json_within`]), so both are validated and encoded by one code path.

use std::borrow::Cow;

use serde_json::{Map, Value};

use crate::StreamSchema;

/// One JSON value as a field of a reading can hold it. Arrays and objects are never valid field
/// values (stream schemas are flat records of scalars), so a parser skips them without storing
/// anything and keeps only a marker, for the refusal to say what was found.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonScalar<'a> {
    Null,
    Bool(bool),
    /// An integer that fits an `i64`.
    Int(i64),
    /// An integer past `i64::MAX`, which JSON allows and no Avro integer holds.
    UInt(u64),
    /// Any other number: written with a fraction or an exponent, `-0` (which serde_json reads as
    /// `-0.0`), or an integer past `u64::MAX` or below `i64::MIN`. Finite: serde_json refuses
    /// numbers out of `f64`'s range.
    Float(f64),
    Str(Cow<'a, str>),
    /// A nested array, skipped.
    Array,
    /// A nested object, skipped.
    Object,
}

impl<'a> JsonScalar<'a> {
    /// An unsigned integer as serde_json reports it: [`JsonScalar::Int`] up to `i64::MAX`.
    pub fn from_u64(value: u64) -> Self {
        i64::try_from(value).map_or(Self::UInt(value), Self::Int)
    }

    /// A float as serde_json reports it; a non-finite one is `null`, as `Value::from(f64)` makes
    /// it, so that both representations of a reading agree.
    pub fn from_f64(value: f64) -> Self {
        if value.is_finite() { Self::Float(value) } else { Self::Null }
    }

    /// The scalar of a `Value`, borrowing its string; an array or object becomes its marker.
    pub fn from_value(value: &'a Value) -> Self {
        match value {
            Value::Null => Self::Null,
            Value::Bool(boolean) => Self::Bool(*boolean),
            Value::Number(number) => {
                if let Some(integer) = number.as_i64() {
                    Self::Int(integer)
                } else if let Some(unsigned) = number.as_u64() {
                    Self::UInt(unsigned)
                } else {
                    // Without serde_json's `arbitrary_precision` (off in this workspace) every
                    // other number is a finite f64.
                    number.as_f64().map_or(Self::Null, Self::from_f64)
                }
            }
            Value::String(text) => Self::Str(Cow::Borrowed(text.as_str())),
            Value::Array(_) => Self::Array,
            Value::Object(_) => Self::Object,
        }
    }

    /// The scalar as a `Value`: a skipped array or object as an empty one. Refusals that quote a
    /// value print this, so that numbers read as serde_json writes them (`1.0`, `1e+300`).
    pub fn to_value(&self) -> Value {
        match self {
            Self::Null => Value::Null,
            Self::Bool(boolean) => Value::Bool(*boolean),
            Self::Int(integer) => Value::from(*integer),
            Self::UInt(unsigned) => Value::from(*unsigned),
            Self::Float(float) => Value::from(*float),
            Self::Str(text) => Value::String(text.to_string()),
            Self::Array => Value::Array(Vec::new()),
            Self::Object => Value::Object(Map::new()),
        }
    }

    /// The JSON type, as refusals name it.
    pub(crate) fn json_type(&self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::Bool(_) => "a boolean",
            Self::Int(_) | Self::UInt(_) | Self::Float(_) => "a number",
            Self::Str(_) => "a string",
            Self::Array => "an array",
            Self::Object => "an object",
        }
    }

    pub(crate) fn is_number(&self) -> bool {
        matches!(self, Self::Int(_) | Self::UInt(_) | Self::Float(_))
    }

    pub(crate) fn as_bool(&self) -> Option<bool> {
        match self {
            Self::Bool(boolean) => Some(*boolean),
            _ => None,
        }
    }

    /// The integer, when it fits an `i64` (as `serde_json::Number::as_i64`).
    pub(crate) fn as_i64(&self) -> Option<i64> {
        match self {
            Self::Int(integer) => Some(*integer),
            Self::UInt(unsigned) => i64::try_from(*unsigned).ok(),
            _ => None,
        }
    }

    /// Any number as an `f64` (as `serde_json::Number::as_f64`: big integers round).
    pub(crate) fn as_f64(&self) -> Option<f64> {
        match self {
            Self::Int(integer) => Some(*integer as f64),
            Self::UInt(unsigned) => Some(*unsigned as f64),
            Self::Float(float) => Some(*float),
            _ => None,
        }
    }

    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(text) => Some(&**text),
            _ => None,
        }
    }
}

/// The fields of one JSON reading, by the schema's field positions; reused from reading to
/// reading ([`ReadingFields::clear`] keeps the allocations). Built for one schema
/// ([`ReadingFields::for_schema`]) and encoded with that schema only.
///
/// A name given twice keeps its last value, as serde_json's `Map` does. Unknown names are kept
/// only for the refusal, which lists each once, sorted, as the `BTreeMap` behind serde_json's
/// `Map` (its `preserve_order` feature is off in this workspace) listed them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadingFields<'a> {
    slots: Vec<Option<JsonScalar<'a>>>,
    unknown_names: Vec<Cow<'a, str>>,
}

impl<'a> ReadingFields<'a> {
    /// An empty table for `schema`'s fields.
    pub fn for_schema(schema: &StreamSchema) -> Self {
        Self { slots: vec![None; schema.fields.len()], unknown_names: Vec::new() }
    }

    /// Empties the table for the next reading, keeping its allocations.
    pub fn clear(&mut self) {
        self.slots.fill(None);
        self.unknown_names.clear();
    }

    /// Gives the field at `position` (see [`StreamSchema::field_position`]) its value, replacing
    /// an earlier one.
    pub fn set(&mut self, position: usize, value: JsonScalar<'a>) {
        if position >= self.slots.len() {
            // Only a table built for another schema is this short; growing beats a panic.
            self.slots.resize(position + 1, None);
        }
        self.slots[position] = Some(value);
    }

    /// The value given for the field at `position`, if any.
    pub fn get(&self, position: usize) -> Option<&JsonScalar<'a>> {
        self.slots.get(position).and_then(Option::as_ref)
    }

    /// Notes a field the schema does not have. Its value is not needed: the refusal names the
    /// field only.
    pub fn add_unknown(&mut self, name: Cow<'a, str>) {
        self.unknown_names.push(name);
    }

    /// Files a field by name: into its slot, or among the unknown names.
    pub fn insert(&mut self, schema: &StreamSchema, name: Cow<'a, str>, value: JsonScalar<'a>) {
        match schema.field_position(&name) {
            Some(position) => self.set(position, value),
            None => self.add_unknown(name),
        }
    }

    /// The unknown names given, each once, sorted.
    pub(crate) fn unknown_names_sorted(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.unknown_names.iter().map(|name| &**name).collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    pub(crate) fn has_unknown(&self) -> bool {
        !self.unknown_names.is_empty()
    }
}
