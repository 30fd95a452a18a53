//! The mapping-table loader on arbitrary text; a table that compiles is then planned against
//! the key names and shapes of the MAE and BEiT fixtures, with and without --img-size.
#![no_main]

use std::sync::OnceLock;

use ckptmap::formats::checkpoint::Checkpoint;
use ckptmap::mapping::plan::{plan, PlanOptions, SourceTensor};
use ckptmap::mapping::table::MappingTable;
use libfuzzer_sys::fuzz_target;

fn sources() -> &'static Vec<Vec<SourceTensor>> {
    static S: OnceLock<Vec<Vec<SourceTensor>>> = OnceLock::new();
    S.get_or_init(|| {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
        ["mae_tiny.pth", "beit_tiny_pt.pth", "beit_tiny_ft.pth"]
            .iter()
            .map(|f| {
                let c = Checkpoint::open(&fixtures.join(f)).expect("fixture");
                let root = ckptmap::inspect::find_state_dict(&c).unwrap_or("");
                c.tensors_under(root)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|t| SourceTensor { name: t.name, shape: t.view.shape.clone(), dtype: t.view.dtype })
                    .collect()
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(table) = MappingTable::parse(text, "fuzz.toml") else { return };
    for s in sources() {
        let _ = plan(&table, s, &PlanOptions::default());
        let _ = plan(&table, s, &PlanOptions { img_size: Some(64), ..Default::default() });
    }
});
