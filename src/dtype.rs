//! Element types a checkpoint tensor can have, and their names in each format.

use std::fmt;

/// A tensor element type. Names follow torch (`float32`), storage classes follow
/// `torch.<X>Storage`, safetensors codes follow its spec (`F32`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    U16,
    U32,
    U64,
    /// torch.float8_e4m3fn (safetensors F8_E4M3).
    F8E4M3Fn,
    F8E5M2,
    F8E4M3Fnuz,
    F8E5M2Fnuz,
    /// torch.float8_e8m0fnu (safetensors F8_E8M0): a power-of-two scale.
    F8E8M0Fnu,
    /// torch.complex64: two f32 (real, imaginary) per element.
    C64,
}

impl DType {
    pub const ALL: [DType; 19] = [
        DType::F64,
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::I64,
        DType::I32,
        DType::I16,
        DType::I8,
        DType::U8,
        DType::Bool,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::F8E4M3Fn,
        DType::F8E5M2,
        DType::F8E4M3Fnuz,
        DType::F8E5M2Fnuz,
        DType::F8E8M0Fnu,
        DType::C64,
    ];

    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 | DType::U64 | DType::C64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::BF16 | DType::I16 | DType::U16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
            DType::F8E4M3Fn | DType::F8E5M2 | DType::F8E4M3Fnuz | DType::F8E5M2Fnuz | DType::F8E8M0Fnu => 1,
        }
    }

    /// The real float types casts and the forward pass work in (not the float8s, which
    /// are carried bit for bit only).
    pub fn is_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }

    /// The legacy storage class torch pickles for this dtype (`FloatStorage`); `None` for
    /// the dtypes torch pickles through `_rebuild_tensor_v3` over an untyped storage.
    pub fn storage_class(self) -> Option<&'static str> {
        Some(match self {
            DType::F64 => "DoubleStorage",
            DType::F32 => "FloatStorage",
            DType::F16 => "HalfStorage",
            DType::BF16 => "BFloat16Storage",
            DType::I64 => "LongStorage",
            DType::I32 => "IntStorage",
            DType::I16 => "ShortStorage",
            DType::I8 => "CharStorage",
            DType::U8 => "ByteStorage",
            DType::Bool => "BoolStorage",
            DType::C64 => "ComplexFloatStorage",
            _ => return None,
        })
    }

    pub fn from_storage_class(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.storage_class() == Some(name))
    }

    /// torch's name of the dtype, as pickled for `_rebuild_tensor_v3` (`float8_e4m3fn`).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F64 => "float64",
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::Bool => "bool",
            DType::U16 => "uint16",
            DType::U32 => "uint32",
            DType::U64 => "uint64",
            DType::F8E4M3Fn => "float8_e4m3fn",
            DType::F8E5M2 => "float8_e5m2",
            DType::F8E4M3Fnuz => "float8_e4m3fnuz",
            DType::F8E5M2Fnuz => "float8_e5m2fnuz",
            DType::F8E8M0Fnu => "float8_e8m0fnu",
            DType::C64 => "complex64",
        }
    }

    pub fn from_torch_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.torch_name() == name)
    }

    /// Short name used in listings and on the command line (`f32`, `bf16`, `bool`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F64 => "f64",
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I64 => "i64",
            DType::I32 => "i32",
            DType::I16 => "i16",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::Bool => "bool",
            DType::U16 => "u16",
            DType::U32 => "u32",
            DType::U64 => "u64",
            DType::F8E4M3Fn => "f8_e4m3fn",
            DType::F8E5M2 => "f8_e5m2",
            DType::F8E4M3Fnuz => "f8_e4m3fnuz",
            DType::F8E5M2Fnuz => "f8_e5m2fnuz",
            DType::F8E8M0Fnu => "f8_e8m0fnu",
            DType::C64 => "c64",
        }
    }

    pub fn from_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == name)
    }

    /// The safetensors header code (`F32`, `BOOL`).
    pub fn safetensors_code(self) -> safetensors::Dtype {
        use safetensors::Dtype as S;
        match self {
            DType::F64 => S::F64,
            DType::F32 => S::F32,
            DType::F16 => S::F16,
            DType::BF16 => S::BF16,
            DType::I64 => S::I64,
            DType::I32 => S::I32,
            DType::I16 => S::I16,
            DType::I8 => S::I8,
            DType::U8 => S::U8,
            DType::Bool => S::BOOL,
            DType::U16 => S::U16,
            DType::U32 => S::U32,
            DType::U64 => S::U64,
            DType::F8E4M3Fn => S::F8_E4M3,
            DType::F8E5M2 => S::F8_E5M2,
            DType::F8E4M3Fnuz => S::F8_E4M3FNUZ,
            DType::F8E5M2Fnuz => S::F8_E5M2FNUZ,
            DType::F8E8M0Fnu => S::F8_E8M0,
            DType::C64 => S::C64,
        }
    }

    pub fn from_safetensors_code(code: safetensors::Dtype) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.safetensors_code() == code)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Decodes little-endian elements of `dtype` to f64 (bool as 0/1; complex as real then
/// imaginary part, two values an element), for comparisons and summaries. `bytes.len()`
/// must be a multiple of the element size.
pub fn decode_f64(bytes: &[u8], dtype: DType) -> Vec<f64> {
    if dtype == DType::C64 {
        return decode_f64(bytes, DType::F32);
    }
    let n = dtype.size();
    bytes
        .chunks_exact(n)
        .map(|c| match dtype {
            DType::F64 => f64::from_le_bytes(c.try_into().unwrap()),
            DType::F32 => f32::from_le_bytes(c.try_into().unwrap()) as f64,
            DType::F16 => half::f16::from_le_bytes(c.try_into().unwrap()).to_f64(),
            DType::BF16 => half::bf16::from_le_bytes(c.try_into().unwrap()).to_f64(),
            DType::I64 => i64::from_le_bytes(c.try_into().unwrap()) as f64,
            DType::I32 => i32::from_le_bytes(c.try_into().unwrap()) as f64,
            DType::I16 => i16::from_le_bytes(c.try_into().unwrap()) as f64,
            DType::I8 => c[0] as i8 as f64,
            DType::U8 => c[0] as f64,
            DType::Bool => (c[0] != 0) as u8 as f64,
            DType::U16 => u16::from_le_bytes(c.try_into().unwrap()) as f64,
            DType::U32 => u32::from_le_bytes(c.try_into().unwrap()) as f64,
            DType::U64 => u64::from_le_bytes(c.try_into().unwrap()) as f64,
            DType::F8E4M3Fn => f8_value(c[0], 3, 7, F8Specials::FiniteNanAllOnes),
            DType::F8E5M2 => f8_value(c[0], 2, 15, F8Specials::Ieee),
            DType::F8E4M3Fnuz => f8_value(c[0], 3, 8, F8Specials::NanIsNegativeZero),
            DType::F8E5M2Fnuz => f8_value(c[0], 2, 16, F8Specials::NanIsNegativeZero),
            DType::F8E8M0Fnu => match c[0] {
                0xff => f64::NAN,
                e => 2f64.powi(e as i32 - 127),
            },
            DType::C64 => unreachable!("complex decoded as f32 pairs above"),
        })
        .collect()
}

/// How a float8 format spends its special bit patterns.
#[derive(Clone, Copy)]
enum F8Specials {
    /// IEEE-like: the top exponent is inf (mantissa 0) or NaN (e5m2).
    Ieee,
    /// No infinities; only S.1111.111 is NaN (e4m3fn).
    FiniteNanAllOnes,
    /// No infinities, no negative zero: 0x80 is the one NaN (the fnuz formats).
    NanIsNegativeZero,
}

/// The value of a float8 with `mant` mantissa bits and exponent `bias`.
fn f8_value(b: u8, mant: u32, bias: i32, specials: F8Specials) -> f64 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp_bits = 7 - mant;
    let e = ((b >> mant) & ((1 << exp_bits) - 1) as u8) as i32;
    let m = (b & ((1 << mant) - 1) as u8) as f64;
    let top = (1 << exp_bits) - 1;
    match specials {
        F8Specials::Ieee if e == top => return if m == 0.0 { sign * f64::INFINITY } else { f64::NAN },
        F8Specials::FiniteNanAllOnes if e == top && m as u32 == (1 << mant) - 1 => return f64::NAN,
        F8Specials::NanIsNegativeZero if b == 0x80 => return f64::NAN,
        _ => {}
    }
    let scale = (1u32 << mant) as f64;
    if e == 0 {
        sign * (m / scale) * 2f64.powi(1 - bias)
    } else {
        sign * (1.0 + m / scale) * 2f64.powi(e - bias)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float8_values_match_torch() {
        // Bit patterns and the values torch gives them (`torch.tensor([b], dtype=torch.uint8)
        // .view(torch.float8_*)`): max finite, smallest subnormal, one, specials.
        let cases: &[(DType, u8, f64)] = &[
            (DType::F8E4M3Fn, 0x7e, 448.0),
            (DType::F8E4M3Fn, 0x01, 2f64.powi(-9)),
            (DType::F8E4M3Fn, 0x38, 1.0),
            (DType::F8E4M3Fn, 0xb8, -1.0),
            (DType::F8E5M2, 0x7b, 57344.0),
            (DType::F8E5M2, 0x7c, f64::INFINITY),
            (DType::F8E5M2, 0x3c, 1.0),
            (DType::F8E4M3Fnuz, 0x40, 1.0),
            (DType::F8E4M3Fnuz, 0x7f, 240.0),
            (DType::F8E5M2Fnuz, 0x40, 1.0),
            (DType::F8E5M2Fnuz, 0x7f, 57344.0),
            (DType::F8E8M0Fnu, 127, 1.0),
            (DType::F8E8M0Fnu, 0, 2f64.powi(-127)),
        ];
        for &(d, b, want) in cases {
            assert_eq!(decode_f64(&[b], d), vec![want], "{d} 0x{b:02x}");
        }
        for (d, b) in [
            (DType::F8E4M3Fn, 0x7f),
            (DType::F8E5M2, 0x7d),
            (DType::F8E4M3Fnuz, 0x80),
            (DType::F8E5M2Fnuz, 0x80),
            (DType::F8E8M0Fnu, 0xff),
        ] {
            assert!(decode_f64(&[b], d)[0].is_nan(), "{d} 0x{b:02x} is NaN");
        }
    }

    #[test]
    fn every_dtype_has_one_name_of_each_kind() {
        for d in DType::ALL {
            assert_eq!(DType::from_name(d.name()), Some(d));
            assert_eq!(DType::from_torch_name(d.torch_name()), Some(d));
            assert_eq!(DType::from_safetensors_code(d.safetensors_code()), Some(d));
            assert_eq!(d.safetensors_code().bitsize(), d.size() * 8, "{d}");
        }
    }
}
