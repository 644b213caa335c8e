//! GGUF (v2 and v3) reader: metadata, tensor directory, and dequantization to `f32`.
//!
//! Layout (little-endian): magic `GGUF`, version `u32`, tensor count `u64`, metadata count `u64`;
//! the metadata key/value pairs; one directory entry per tensor (name, dimensions, ggml type,
//! offset into the data section); padding to `general.alignment` (default 32); the tensor data.
//!
//! Supported tensor types: F32, F16, Q8_0, Q4_0 and Q4_1 (blocks of 32 values). Anything else is
//! an [`GgufError::UnsupportedTensorType`] naming the tensor, never a panic; so is every form of
//! truncation or inconsistency, with the byte offset where reading failed.

use std::collections::BTreeMap;
use std::path::Path;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is one (of any width, and not negative).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(u64::from(v)),
            Self::U16(v) => Some(u64::from(v)),
            Self::U32(v) => Some(u64::from(v)),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(f64::from(v)),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// ggml tensor types this reader knows by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q8_0,
    /// Any other type id (K-quants, BF16, ...): listed, not dequantized.
    Other(u32),
}

impl GgmlType {
    fn from_id(id: u32) -> Self {
        match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            8 => Self::Q8_0,
            other => Self::Other(other),
        }
    }

    /// (values per block, bytes per block) for the supported types.
    fn block(&self) -> Option<(u64, u64)> {
        match self {
            Self::F32 => Some((1, 4)),
            Self::F16 => Some((1, 2)),
            Self::Q4_0 => Some((32, 18)),
            Self::Q4_1 => Some((32, 20)),
            Self::Q8_0 => Some((32, 34)),
            Self::Other(_) => None,
        }
    }
}

/// One entry of the tensor directory.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, innermost first (ggml order).
    pub dims: Vec<u64>,
    pub dtype: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of values.
    pub fn elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A file that is not a GGUF this reader can use.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("not a GGUF file: magic {0:#010x}, expected 0x46554747 (\"GGUF\")")]
    BadMagic(u32),
    #[error("GGUF version {0} is not supported (2 and 3 are)")]
    UnsupportedVersion(u32),
    #[error("file truncated or corrupt while reading {what} at byte {offset}")]
    Truncated { what: String, offset: usize },
    #[error("metadata `{key}` has unknown value type {ty}")]
    UnknownValueType { key: String, ty: u32 },
    #[error(
        "tensor `{name}` has type {dtype:?}, which this reader cannot dequantize (F32, F16, Q8_0, Q4_0, Q4_1 are supported)"
    )]
    UnsupportedTensorType { name: String, dtype: GgmlType },
    #[error("tensor `{name}`: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("tensor `{0}` is missing")]
    MissingTensor(String),
    #[error("metadata `{0}` is missing or has the wrong type")]
    MissingKey(String),
}

/// A parsed GGUF file held in memory.
#[derive(Debug)]
pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data_offset: usize,
    bytes: Vec<u8>,
}

/// Bounds-checked little-endian cursor.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.b.len())
            .ok_or_else(|| GgufError::Truncated {
                what: what.to_string(),
                offset: self.pos,
            })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that must fit in memory: refuses counts larger than the bytes left.
    fn count(&mut self, what: &str) -> Result<usize, GgufError> {
        let at = self.pos;
        let n = self.u64(what)?;
        usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.b.len() - self.pos)
            .ok_or(GgufError::Truncated {
                what: format!("{what} (count {n})"),
                offset: at,
            })
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let n = self.count(what)?;
        let at = self.pos;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| GgufError::Truncated {
            what: format!("{what} (not UTF-8)"),
            offset: at,
        })
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(key)?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array(key)?)),
            2 => Value::U16(u16::from_le_bytes(self.array(key)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(key)?)),
            4 => Value::U32(self.u32(key)?),
            5 => Value::I32(i32::from_le_bytes(self.array(key)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(key)?)),
            7 => Value::Bool(self.array::<1>(key)?[0] != 0),
            8 => Value::String(self.string(key)?),
            9 if depth < 4 => {
                let inner = self.u32(key)?;
                let n = self.count(key)?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(inner, key, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(key)?),
            11 => Value::I64(i64::from_le_bytes(self.array(key)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(key)?)),
            ty => {
                return Err(GgufError::UnknownValueType {
                    key: key.to_string(),
                    ty,
                });
            }
        })
    }
}

/// IEEE half → f32.
///
/// ```
/// use dopd_model::gguf::f16_to_f32;
/// assert_eq!(f16_to_f32(0x3c00), 1.0);
/// assert_eq!(f16_to_f32(0xc000), -2.0);
/// ```
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h >> 15) << 31;
    let exp = u32::from((h >> 10) & 0x1f);
    let frac = u32::from(h & 0x3ff);
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, f) => {
            // Subnormal: normalise.
            let mut e = 127 - 15 + 1;
            let mut f = f;
            while f & 0x400 == 0 {
                f <<= 1;
                e -= 1;
            }
            sign | (e << 23) | ((f & 0x3ff) << 13)
        }
        (0x1f, f) => sign | 0x7f80_0000 | (f << 13),
        (e, f) => sign | ((e + 127 - 15) << 23) | (f << 13),
    };
    f32::from_bits(bits)
}

impl Gguf {
    /// Reads and parses a file.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let bytes = std::fs::read(path).map_err(|source| GgufError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(bytes)
    }

    /// Parses a GGUF image.
    pub fn parse(bytes: Vec<u8>) -> Result<Self, GgufError> {
        let mut c = Cursor { b: &bytes, pos: 0 };
        let magic = c.u32("magic")?;
        if magic != 0x4655_4747 {
            return Err(GgufError::BadMagic(magic));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = c.count("tensor count")?;
        let n_kv = c.count("metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32(&key)?;
            let v = c.value(ty, &key, 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32(&name)?;
            if n_dims > 8 {
                return Err(GgufError::BadTensor {
                    name,
                    reason: format!("{n_dims} dimensions"),
                });
            }
            let dims = (0..n_dims)
                .map(|_| c.u64(&name))
                .collect::<Result<Vec<_>, _>>()?;
            let dtype = GgmlType::from_id(c.u32(&name)?);
            let offset = c.u64(&name)?;
            tensors.push(TensorInfo {
                name,
                dims,
                dtype,
                offset,
            });
        }
        let align = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32)
            .max(1);
        let align = usize::try_from(align).unwrap_or(32);
        let data_offset =
            c.pos
                .div_ceil(align)
                .checked_mul(align)
                .ok_or_else(|| GgufError::Truncated {
                    what: format!("data aligned to {align} bytes"),
                    offset: c.pos,
                })?;
        let g = Self {
            version,
            metadata,
            tensors,
            data_offset,
            bytes,
        };
        for t in &g.tensors {
            g.check_extent(t)?;
        }
        Ok(g)
    }

    /// Checks that a tensor's data lies inside the file (for supported types).
    fn check_extent(&self, t: &TensorInfo) -> Result<(), GgufError> {
        let Some((per_block, block_bytes)) = t.dtype.block() else {
            return Ok(());
        };
        let n = t.dims.iter().try_fold(1u64, |a, d| a.checked_mul(*d));
        let bad = |reason: String| GgufError::BadTensor {
            name: t.name.clone(),
            reason,
        };
        let n = n.ok_or_else(|| bad(format!("dimensions {:?} overflow", t.dims)))?;
        if n % per_block != 0 {
            return Err(bad(format!(
                "{n} values are not whole blocks of {per_block}"
            )));
        }
        // A header can claim any count: every step is checked (a wrapped size would pass).
        let size = (n / per_block).checked_mul(block_bytes);
        let start = (self.data_offset as u64).checked_add(t.offset);
        match start.zip(size).and_then(|(s, size)| s.checked_add(size)) {
            Some(end) if end <= self.bytes.len() as u64 => Ok(()),
            _ => Err(GgufError::Truncated {
                what: format!(
                    "tensor `{}` ({} bytes at data offset {})",
                    t.name,
                    size.map_or_else(|| "too many".to_string(), |s| s.to_string()),
                    t.offset
                ),
                offset: self.bytes.len(),
            }),
        }
    }

    /// The tensor `name` and its bytes as stored (blocks for the quantized types).
    pub fn raw(&self, name: &str) -> Result<(&TensorInfo, &[u8]), GgufError> {
        let t = self.tensor(name)?;
        let Some((per_block, block_bytes)) = t.dtype.block() else {
            return Err(GgufError::UnsupportedTensorType {
                name: t.name.clone(),
                dtype: t.dtype,
            });
        };
        // `parse` checked the extent.
        let n = t.elements() as usize;
        let start = self.data_offset + t.offset as usize;
        let len = n / per_block as usize * block_bytes as usize;
        let data = self
            .bytes
            .get(start..start + len)
            .ok_or_else(|| GgufError::BadTensor {
                name: name.into(),
                reason: format!("{len} bytes at {start} lie past the end of the file"),
            })?;
        Ok((t, data))
    }

    pub fn tensor(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| GgufError::MissingTensor(name.into()))
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// An unsigned integer metadata value.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| GgufError::MissingKey(key.into()))
    }

    /// A float metadata value.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| GgufError::MissingKey(key.into()))
    }

    /// A string metadata value.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| GgufError::MissingKey(key.into()))
    }

    /// All values of a tensor as `f32`, in file order (innermost dimension fastest).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let (t, data) = self.raw(name)?;
        let block_bytes = t.dtype.block().map_or(4, |b| b.1);
        let n = t.elements() as usize;
        let half = |b: &[u8], i: usize| f16_to_f32(u16::from_le_bytes([b[i], b[i + 1]]));
        let mut out = Vec::with_capacity(n);
        match t.dtype {
            GgmlType::F32 => {
                out.extend(
                    data.chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
            }
            GgmlType::F16 => out.extend(data.chunks_exact(2).map(|c| half(c, 0))),
            GgmlType::Q8_0 => {
                for b in data.chunks_exact(34) {
                    let d = half(b, 0);
                    out.extend(b[2..].iter().map(|&q| f32::from(q as i8) * d));
                }
            }
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let q41 = t.dtype == GgmlType::Q4_1;
                for b in data.chunks_exact(block_bytes as usize) {
                    let d = half(b, 0);
                    let (m, qs) = if q41 {
                        (half(b, 2), &b[4..])
                    } else {
                        (-8.0 * d, &b[2..])
                    };
                    // Low nibbles are values 0..16, high nibbles values 16..32.
                    out.extend(qs.iter().map(|&q| f32::from(q & 0x0f) * d + m));
                    out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
                }
            }
            GgmlType::Other(_) => unreachable!("filtered above"),
        }
        Ok(out)
    }
}
