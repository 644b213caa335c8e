//! Helpers shared by the worker's integration tests.
#![allow(dead_code)]

/// Writes GGUF v3 images for the tests.
#[derive(Default)]
pub struct Writer {
    kv: Vec<u8>,
    n_kv: u64,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

fn gstr(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl Writer {
    pub fn kv_u32(mut self, k: &str, v: u32) -> Self {
        gstr(&mut self.kv, k);
        self.kv.extend(4u32.to_le_bytes());
        self.kv.extend(v.to_le_bytes());
        self.n_kv += 1;
        self
    }

    pub fn kv_str(mut self, k: &str, v: &str) -> Self {
        gstr(&mut self.kv, k);
        self.kv.extend(8u32.to_le_bytes());
        gstr(&mut self.kv, v);
        self.n_kv += 1;
        self
    }

    pub fn kv_str_array(mut self, k: &str, items: &[&str]) -> Self {
        gstr(&mut self.kv, k);
        self.kv.extend(9u32.to_le_bytes());
        self.kv.extend(8u32.to_le_bytes());
        self.kv.extend((items.len() as u64).to_le_bytes());
        for s in items {
            gstr(&mut self.kv, s);
        }
        self.n_kv += 1;
        self
    }

    pub fn tensor(mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> Self {
        self.tensors.push((name.into(), dims.to_vec(), ty, data));
        self
    }

    pub fn build(self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend(&self.kv);
        let mut offset = 0u64;
        let mut blobs = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            gstr(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            let mut blob = data.clone();
            blob.resize(blob.len().div_ceil(32) * 32, 0);
            offset += blob.len() as u64;
            blobs.push(blob);
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        for b in blobs {
            out.extend(b);
        }
        out
    }
}

/// f32 → IEEE half, exact for the small values used in the tests.
pub fn f16(x: f32) -> [u8; 2] {
    // Exact for the small values used here (powers of two and small integers).
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    if x == 0.0 {
        return sign.to_le_bytes();
    }
    let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
    let frac = ((bits >> 13) & 0x3ff) as u16;
    (sign | ((exp as u16) << 10) | frac).to_le_bytes()
}

/// The small KV layout of the cache tests: 2 layers, 2 KV heads of 3, blocks of 4 tokens.
pub fn kv_layout() -> dopd_worker::kv::KvLayout {
    dopd_worker::kv::KvLayout {
        layers: 2,
        kv_heads: 2,
        head_dim: 3,
        block_size: 4,
        model_hash: 42,
    }
}
