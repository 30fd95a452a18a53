//! Every fixture that real PyTorch wrote reads back with the values the fixture script
//! recorded (fixtures/manifest.json); our writer reproduces torch.save's data.pkl byte for
//! byte and round-trips every fixture.

use std::io::Read;
use std::path::Path;

use ckptmap::dtype::decode_f64;
use ckptmap::formats::checkpoint::Checkpoint;
use ckptmap::formats::Value;
use ckptmap::write::pth::{write_pth, TensorToWrite};
use serde_json::Value as Json;

use crate::util::fixture;

fn manifest() -> Json {
    serde_json::from_str(&std::fs::read_to_string(fixture("manifest.json")).unwrap()).unwrap()
}

#[test]
fn every_fixture_matches_the_manifest() {
    let m = manifest();
    let files = m["files"].as_object().unwrap();
    assert!(files.len() >= 15, "manifest lists only {} files", files.len());
    for (file, info) in files {
        let ckpt = Checkpoint::open(&fixture(file)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ckpt.kind().name(), info["container"].as_str().unwrap(), "{file}");
        let root = info["root"].as_str().unwrap();
        let tensors = ckpt.tensors_under(root).unwrap_or_else(|| panic!("{file}: no root {root:?}"));
        let expected = info["tensors"].as_array().unwrap();
        assert_eq!(tensors.len(), expected.len(), "{file}: tensor count");
        for (t, e) in tensors.iter().zip(expected) {
            let name = e["name"].as_str().unwrap();
            assert_eq!(t.name, name, "{file}: order");
            assert_eq!(t.view.dtype.name(), e["dtype"].as_str().unwrap(), "{file}:{name}");
            let shape: Vec<usize> = serde_json::from_value(e["shape"].clone()).unwrap();
            assert_eq!(t.view.shape, shape, "{file}:{name}");
            if info["container"] != "safetensors" {
                let stride: Vec<usize> = serde_json::from_value(e["stride"].clone()).unwrap();
                assert_eq!(t.view.strides, stride, "{file}:{name}");
                assert_eq!(t.view.offset as u64, e["storage_offset"].as_u64().unwrap(), "{file}:{name}");
            }
            let values = decode_f64(&ckpt.read(t.view).unwrap(), t.view.dtype);
            let sum: f64 = values.iter().sum();
            let want = e["sum"].as_f64().unwrap();
            assert!((sum - want).abs() <= 1e-6 * (1.0 + want.abs()), "{file}:{name}: sum {sum} vs {want}");
            for (i, f) in e["first"].as_array().unwrap().iter().enumerate() {
                let want = f.as_f64().unwrap();
                assert!(
                    (values[i] - want).abs() <= 1e-12 * (1.0 + want.abs()),
                    "{file}:{name}[{i}]: {} vs {want}",
                    values[i]
                );
            }
        }
        for (key, summary) in info["non_tensor"].as_object().unwrap() {
            let v = ckpt.subtree(key).unwrap_or_else(|| panic!("{file}: no {key}"));
            let s = summary.as_str().unwrap();
            match v {
                // numpy scalars pickle as a REDUCE of numpy's `scalar` constructor.
                Value::Opaque(class) => assert!(
                    class == s
                        || (s.starts_with("numpy.") && class.starts_with("numpy.") && class.ends_with(".scalar")),
                    "{file}:{key}: {class} vs {s}"
                ),
                Value::Dict(_) => assert_eq!(s, "dict"),
                Value::Int(i) => assert_eq!(i.to_string(), s),
                other => assert_eq!(other.summary(), s, "{file}:{key}"),
            }
        }
    }
}

#[test]
fn shared_storage_views_read_correctly() {
    let ckpt = Checkpoint::open(&fixture("views.pth")).unwrap();
    let get = |n: &str| {
        let t = ckpt.tensors().into_iter().find(|t| t.name == n).unwrap();
        decode_f64(&ckpt.read(t.view).unwrap(), t.view.dtype)
    };
    let base = get("base"); // [4, 6]
    assert_eq!(get("row"), base[6..12].to_vec());
    let transposed = get("transposed"); // [6, 4]
    for i in 0..6 {
        for j in 0..4 {
            assert_eq!(transposed[i * 4 + j], base[j * 6 + i]);
        }
    }
    let step = get("step"); // base[:, ::2]
    for i in 0..4 {
        for j in 0..3 {
            assert_eq!(step[i * 3 + j], base[i * 6 + 2 * j]);
        }
    }
    assert_eq!(get("tied_a"), get("tied_b"));
}

fn data_pkl(path: &Path) -> Vec<u8> {
    let mut z = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    let name = z.file_names().map(|n| n.unwrap().to_string()).find(|n| n.ends_with("/data.pkl")).unwrap();
    let mut out = Vec::new();
    z.by_name(&name).unwrap().read_to_end(&mut out).unwrap();
    out
}

/// Writes `ckpt`'s state dict (at `root`) with our writer.
fn rewrite(ckpt: &Checkpoint, root: &str, dest: &Path) {
    let tensors = ckpt.tensors_under(root).unwrap();
    let specs: Vec<TensorToWrite> =
        tensors.iter().map(|t| TensorToWrite { name: &t.name, dtype: t.view.dtype, shape: &t.view.shape }).collect();
    let file = std::fs::File::create(dest).unwrap();
    write_pth(file, "out", &specs, |i, w| ckpt.write_to(tensors[i].view, w)).unwrap();
}

#[test]
fn our_data_pkl_is_byte_identical_to_torch_save() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["small", "dtypes", "many", "single"] {
        let golden = fixture(&format!("golden/{name}.pth"));
        let ckpt = Checkpoint::open(&golden).unwrap();
        let out = dir.path().join(format!("{name}.pth"));
        rewrite(&ckpt, "", &out);
        let ours = data_pkl(&out);
        let theirs = data_pkl(&golden);
        if ours != theirs {
            let at = ours.iter().zip(&theirs).position(|(a, b)| a != b).unwrap_or(ours.len().min(theirs.len()));
            panic!("{name}: data.pkl differs at byte {at} (ours {} bytes, torch {} bytes)", ours.len(), theirs.len());
        }
    }
}

#[test]
fn golden_check_can_fail() {
    // The same comparison on a different state dict must see a difference.
    assert_ne!(data_pkl(&fixture("golden/small.pth")), data_pkl(&fixture("golden/single.pth")));
}

#[test]
fn every_fixture_round_trips_through_our_writer() {
    let dir = tempfile::tempdir().unwrap();
    let m = manifest();
    for (file, info) in m["files"].as_object().unwrap() {
        let src = fixture(file);
        let ckpt = Checkpoint::open(&src).unwrap();
        let root = info["root"].as_str().unwrap();
        let out = dir.path().join("rt.pth");
        rewrite(&ckpt, root, &out);
        let back = Checkpoint::open(&out).unwrap();
        let report = ckptmap::inspect::diff(&ckpt, &back, Some(root), Some("")).unwrap();
        assert!(report.same(), "{file}: round trip differs: {:?} {:?}", report.only_in_a, report.value_diffs.len());
        assert_eq!(report.compared, info["tensors"].as_array().unwrap().len());
        // Order is kept too.
        let names_in: Vec<String> = ckpt.tensors_under(root).unwrap().into_iter().map(|t| t.name).collect();
        let names_out: Vec<String> = back.tensors().into_iter().map(|t| t.name).collect();
        assert_eq!(names_in, names_out, "{file}");
    }
}
