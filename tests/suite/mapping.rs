//! Mapping tables and the planner, on synthetic checkpoint key sets (names, shapes, dtypes)
//! built from the official MAE / BEiT layouts, checked against an independently written
//! list of MMSeg backbone parameter names (reference §1.5).

use ckptmap::mapping::table::UnknownKeys;
use ckptmap::mapping::{
    builtin_tables, detect, detect_among, plan, Fate, MappingTable, Origin, Plan, PlanError, PlanOptions, SourceTensor,
    TableError,
};
use ckptmap::DType;

use crate::util::{fixture, mmseg_vit_b_512_keys};

fn t(name: &str, shape: &[usize]) -> SourceTensor {
    SourceTensor { name: name.to_string(), shape: shape.to_vec(), dtype: DType::F32 }
}

fn ti64(name: &str, shape: &[usize]) -> SourceTensor {
    SourceTensor { name: name.to_string(), shape: shape.to_vec(), dtype: DType::I64 }
}

/// facebookresearch/mae encoder keys (pretrain, with the final `norm` when `final_norm`):
/// `ckptmap::synth`'s layout, for a model trained on a `grid`×`grid` patch grid.
fn mae_encoder(dim: usize, depth: usize, grid: usize, patch: usize, final_norm: bool) -> Vec<SourceTensor> {
    ckptmap::synth::mae_pretrain_layout_at(dim, depth, patch, grid * patch)
        .into_iter()
        .filter(|(name, _)| final_norm || !name.starts_with("norm."))
        .map(|(name, shape)| t(&name, &shape))
        .collect()
}

fn mae_vit_b() -> Vec<SourceTensor> {
    mae_encoder(768, 12, 14, 16, true)
}

/// mae_pretrain_vit_base_full.pth / mae_visualize_vit_base.pth: encoder + decoder.
fn mae_vit_b_full() -> Vec<SourceTensor> {
    let mut v = mae_vit_b();
    v.push(t("mask_token", &[1, 1, 512]));
    v.push(t("decoder_embed.weight", &[512, 768]));
    v.push(t("decoder_embed.bias", &[512]));
    v.push(t("decoder_pos_embed", &[1, 197, 512]));
    for i in 0..8 {
        v.push(t(&format!("decoder_blocks.{i}.norm1.weight"), &[512]));
        v.push(t(&format!("decoder_blocks.{i}.attn.qkv.weight"), &[1536, 512]));
        v.push(t(&format!("decoder_blocks.{i}.attn.qkv.bias"), &[1536]));
        v.push(t(&format!("decoder_blocks.{i}.mlp.fc1.weight"), &[2048, 512]));
    }
    v.push(t("decoder_norm.weight", &[512]));
    v.push(t("decoder_norm.bias", &[512]));
    v.push(t("decoder_pred.weight", &[768, 512]));
    v.push(t("decoder_pred.bias", &[768]));
    v
}

/// mae_finetuned_vit_base.pth: no `norm`, but `fc_norm` and `head`.
fn mae_vit_b_finetuned() -> Vec<SourceTensor> {
    let mut v = mae_encoder(768, 12, 14, 16, false);
    v.push(t("fc_norm.weight", &[768]));
    v.push(t("fc_norm.bias", &[768]));
    v.push(t("head.weight", &[1000, 768]));
    v.push(t("head.bias", &[1000]));
    v
}

fn rows(window: usize) -> usize {
    (2 * window - 1) * (2 * window - 1) + 3
}

/// unilm BEiT blocks (q/v bias, layer scale), optionally with per-layer tables + indices.
fn beit_blocks(v: &mut Vec<SourceTensor>, dim: usize, depth: usize, heads: usize, per_layer: Option<usize>) {
    let mlp = 4 * dim;
    for i in 0..depth {
        let b = format!("blocks.{i}");
        v.push(t(&format!("{b}.gamma_1"), &[dim]));
        v.push(t(&format!("{b}.gamma_2"), &[dim]));
        v.push(t(&format!("{b}.norm1.weight"), &[dim]));
        v.push(t(&format!("{b}.norm1.bias"), &[dim]));
        v.push(t(&format!("{b}.attn.q_bias"), &[dim]));
        v.push(t(&format!("{b}.attn.v_bias"), &[dim]));
        v.push(t(&format!("{b}.attn.qkv.weight"), &[3 * dim, dim]));
        if let Some(w) = per_layer {
            v.push(t(&format!("{b}.attn.relative_position_bias_table"), &[rows(w), heads]));
            v.push(ti64(&format!("{b}.attn.relative_position_index"), &[w * w + 1, w * w + 1]));
        }
        v.push(t(&format!("{b}.attn.proj.weight"), &[dim, dim]));
        v.push(t(&format!("{b}.attn.proj.bias"), &[dim]));
        v.push(t(&format!("{b}.norm2.weight"), &[dim]));
        v.push(t(&format!("{b}.norm2.bias"), &[dim]));
        v.push(t(&format!("{b}.mlp.fc1.weight"), &[mlp, dim]));
        v.push(t(&format!("{b}.mlp.fc1.bias"), &[mlp]));
        v.push(t(&format!("{b}.mlp.fc2.weight"), &[dim, mlp]));
        v.push(t(&format!("{b}.mlp.fc2.bias"), &[dim]));
    }
}

/// beit_*_pt22k.pth: shared rel_pos_bias, mask_token, norm, lm_head.
fn beit_pretrain(dim: usize, depth: usize, heads: usize, window: usize) -> Vec<SourceTensor> {
    let mut v = vec![
        t("cls_token", &[1, 1, dim]),
        t("mask_token", &[1, 1, dim]),
        t("patch_embed.proj.weight", &[dim, 3, 16, 16]),
        t("patch_embed.proj.bias", &[dim]),
    ];
    beit_blocks(&mut v, dim, depth, heads, None);
    v.push(t("rel_pos_bias.relative_position_bias_table", &[rows(window), heads]));
    v.push(ti64("rel_pos_bias.relative_position_index", &[window * window + 1, window * window + 1]));
    v.push(t("norm.weight", &[dim]));
    v.push(t("norm.bias", &[dim]));
    v.push(t("lm_head.weight", &[8192, dim]));
    v.push(t("lm_head.bias", &[8192]));
    v
}

fn beit_b_pretrain() -> Vec<SourceTensor> {
    beit_pretrain(768, 12, 12, 14)
}

/// beitv2_base_patch16_224_pt1k.pth: + cls_pt_layers (2 blocks), cls_pt_norm.
fn beitv2_b_pretrain() -> Vec<SourceTensor> {
    let mut v = beit_b_pretrain();
    for i in 0..2 {
        v.push(t(&format!("cls_pt_layers.{i}.norm1.weight"), &[768]));
        v.push(t(&format!("cls_pt_layers.{i}.attn.qkv.weight"), &[2304, 768]));
        v.push(t(&format!("cls_pt_layers.{i}.attn.q_bias"), &[768]));
    }
    v.push(t("cls_pt_norm.weight", &[768]));
    v
}

/// beit_*_pt22k_ft22k.pth: per-layer tables + indices, fc_norm, head [21841, D].
fn beit_finetuned(dim: usize, depth: usize, heads: usize, window: usize) -> Vec<SourceTensor> {
    let mut v = vec![
        t("cls_token", &[1, 1, dim]),
        t("patch_embed.proj.weight", &[dim, 3, 16, 16]),
        t("patch_embed.proj.bias", &[dim]),
    ];
    beit_blocks(&mut v, dim, depth, heads, Some(window));
    v.push(t("fc_norm.weight", &[dim]));
    v.push(t("fc_norm.bias", &[dim]));
    v.push(t("head.weight", &[21841, dim]));
    v.push(t("head.bias", &[21841]));
    v
}

/// MMSeg MAE backbone parameter names in state-dict order (mmseg/models/backbones/mae.py,
/// beit.py: own parameters before children; buffers after parameters).
fn mmseg_mae_keys(depth: usize) -> Vec<String> {
    let mut v: Vec<String> = ["cls_token", "pos_embed", "patch_embed.projection.weight", "patch_embed.projection.bias"]
        .map(String::from)
        .to_vec();
    for i in 0..depth {
        for k in [
            "gamma_1",
            "gamma_2",
            "ln1.weight",
            "ln1.bias",
            "attn.relative_position_bias_table",
            "attn.relative_position_index",
            "attn.qkv.weight",
            "attn.qkv.bias",
            "attn.proj.weight",
            "attn.proj.bias",
            "ln2.weight",
            "ln2.bias",
            "ffn.layers.0.0.weight",
            "ffn.layers.0.0.bias",
            "ffn.layers.1.weight",
            "ffn.layers.1.bias",
        ] {
            v.push(format!("layers.{i}.{k}"));
        }
    }
    v
}

/// MMSeg BEiT backbone (qv_bias=True) parameter names in state-dict order.
fn mmseg_beit_keys(depth: usize) -> Vec<String> {
    let mut v: Vec<String> =
        ["cls_token", "patch_embed.projection.weight", "patch_embed.projection.bias"].map(String::from).to_vec();
    for i in 0..depth {
        for k in [
            "gamma_1",
            "gamma_2",
            "ln1.weight",
            "ln1.bias",
            "attn.q_bias",
            "attn.v_bias",
            "attn.relative_position_bias_table",
            "attn.relative_position_index",
            "attn.qkv.weight",
            "attn.proj.weight",
            "attn.proj.bias",
            "ln2.weight",
            "ln2.bias",
            "ffn.layers.0.0.weight",
            "ffn.layers.0.0.bias",
            "ffn.layers.1.weight",
            "ffn.layers.1.bias",
        ] {
            v.push(format!("layers.{i}.{k}"));
        }
    }
    v
}

fn without(keys: Vec<String>, suffixes: &[&str]) -> Vec<String> {
    keys.into_iter().filter(|k| !suffixes.iter().any(|s| k.ends_with(s))).collect()
}

fn mae() -> &'static MappingTable {
    MappingTable::builtin("mae").unwrap()
}

fn beit() -> &'static MappingTable {
    MappingTable::builtin("beit").unwrap()
}

fn targets(p: &Plan) -> Vec<String> {
    p.outputs.iter().map(|o| o.target.clone()).collect()
}

fn out<'p>(p: &'p Plan, target: &str) -> &'p ckptmap::mapping::PlannedTensor {
    p.outputs.iter().find(|o| o.target == target).unwrap_or_else(|| panic!("no output {target}"))
}

fn opts(img_size: Option<usize>) -> PlanOptions {
    PlanOptions { img_size, ..Default::default() }
}

fn plan_err(table: &MappingTable, sources: &[SourceTensor], o: &PlanOptions) -> String {
    let e = plan(table, sources, o).expect_err("planning should fail");
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "error is not one line: {msg}");
    msg
}

fn table_err(text: &str) -> String {
    let e = MappingTable::parse(text, "test.toml").expect_err("table should be rejected");
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "error is not one line: {msg}");
    msg
}

const LAYER_ONLY_FROM_TABLES: [&str; 4] =
    ["relative_position_bias_table", "relative_position_index", "gamma_1", "gamma_2"];

// ---------------------------------------------------------------------------------------
// MAE

#[test]
fn mae_pretrain_clean_output_is_the_backbone_minus_what_the_source_lacks() {
    let p = plan(mae(), &mae_vit_b(), &opts(None)).unwrap();
    assert_eq!(targets(&p), without(mmseg_mae_keys(12), &LAYER_ONLY_FROM_TABLES));
    assert_eq!(out(&p, "pos_embed").shape, [1, 197, 768]);
    assert_eq!(out(&p, "layers.11.attn.qkv.bias").shape, [2304]);
    assert_eq!(
        out(&p, "layers.3.ffn.layers.0.0.weight").origin,
        Origin::Rename { source: "blocks.3.mlp.fc1.weight".into() }
    );
    assert_eq!(out(&p, "cls_token").origin, Origin::Keep { source: "cls_token".into() });
    assert!(!targets(&p).iter().any(|k| k.starts_with("patch_embed.proj.")), "no 1.x duplicate");
    let dropped: Vec<(&str, &str)> = p.dropped.iter().map(|d| (d.source.as_str(), d.rule.as_str())).collect();
    assert_eq!(dropped, [("norm.weight", "final-norm"), ("norm.bias", "final-norm")]);
    assert!(p.dropped[0].reason.contains("final_norm=False"));
    assert_eq!(p.vars["depth"], 12);
    assert_eq!(p.vars["dim"], 768);
    assert_eq!(p.vars["heads"], 12);
    assert_eq!(p.vars["src_grid"], 14);
    assert_eq!(p.vars["patch"], 16);
    assert!(!p.vars.contains_key("dst_grid"));
    assert!(p.outputs.iter().all(|o| o.dtype == DType::F32));
}

#[test]
fn mae_pretrain_load_ready_512_is_the_whole_backbone() {
    let p = plan(mae(), &mae_vit_b(), &opts(Some(512))).unwrap();
    assert_eq!(targets(&p), mmseg_mae_keys(12));
    let pos = out(&p, "pos_embed");
    assert_eq!(pos.shape, [1, 1025, 768]);
    assert_eq!(
        pos.origin,
        Origin::ResizeAbsPosEmbed { source: "pos_embed".into(), num_extra: 1, old_grid: 14, new_grid: 32 }
    );
    for i in [0, 11] {
        let table = out(&p, &format!("layers.{i}.attn.relative_position_bias_table"));
        assert_eq!(table.shape, [3972, 12]);
        assert_eq!(table.origin, Origin::Fill { value: 0.0 });
        assert_eq!(table.dtype, DType::F32);
        let index = out(&p, &format!("layers.{i}.attn.relative_position_index"));
        assert_eq!(index.shape, [1025, 1025]);
        assert_eq!(index.origin, Origin::RelPosIndex { window: 32 });
        assert_eq!(index.dtype, DType::I64);
        for g in ["gamma_1", "gamma_2"] {
            let gamma = out(&p, &format!("layers.{i}.{g}"));
            assert_eq!(gamma.shape, [768]);
            assert_eq!(gamma.origin, Origin::Fill { value: 1.0 });
        }
    }
    assert_eq!(p.vars["dst_grid"], 32);
    assert_eq!(p.vars["grid"], 32);
    assert_eq!(p.img_size, Some(512));
    assert!(p.notes.iter().any(|n| n.contains("zeros")), "{:?}", p.notes);
    assert_eq!(p.generated().count(), 12 * 4);
}

#[test]
fn mae_load_ready_at_source_size_copies_pos_embed() {
    let p = plan(mae(), &mae_vit_b(), &opts(Some(224))).unwrap();
    assert_eq!(out(&p, "pos_embed").origin, Origin::Rename { source: "pos_embed".into() });
    assert_eq!(out(&p, "layers.0.attn.relative_position_bias_table").shape, [732, 12]);
    assert!(p.notes.iter().any(|n| n.contains("copied without resizing")), "{:?}", p.notes);
}

#[test]
fn mae_full_drops_the_decoder_with_reasons() {
    let p = plan(mae(), &mae_vit_b_full(), &opts(None)).unwrap();
    assert_eq!(targets(&p), without(mmseg_mae_keys(12), &LAYER_ONLY_FROM_TABLES));
    let decoder: Vec<_> = p.dropped.iter().filter(|d| d.rule == "decoder").collect();
    assert_eq!(decoder.len(), 1 + 3 + 8 * 4 + 4);
    assert!(decoder.iter().any(|d| d.source == "mask_token"));
    assert!(decoder.iter().any(|d| d.source == "decoder_blocks.7.attn.qkv.bias"));
    assert!(decoder[0].reason.contains("decoder"));
}

#[test]
fn mae_finetuned_drops_fc_norm_and_head() {
    let p = plan(mae(), &mae_vit_b_finetuned(), &opts(Some(512))).unwrap();
    assert_eq!(targets(&p), mmseg_mae_keys(12));
    let dropped: Vec<(&str, &str)> = p.dropped.iter().map(|d| (d.source.as_str(), d.rule.as_str())).collect();
    assert_eq!(
        dropped,
        [("fc_norm.weight", "fc-norm"), ("fc_norm.bias", "fc-norm"), ("head.weight", "head"), ("head.bias", "head")]
    );
}

#[test]
fn module_prefix_is_stripped_and_sources_keep_their_names() {
    let sources: Vec<_> = mae_vit_b()
        .into_iter()
        .map(|mut s| {
            s.name = format!("module.{}", s.name);
            s
        })
        .collect();
    let p = plan(mae(), &sources, &opts(None)).unwrap();
    assert_eq!(targets(&p), without(mmseg_mae_keys(12), &LAYER_ONLY_FROM_TABLES));
    assert_eq!(out(&p, "layers.0.ln1.weight").origin, Origin::Rename { source: "module.blocks.0.norm1.weight".into() });
    assert_eq!(p.dropped[0].source, "module.norm.weight");
    assert!(p.notes.iter().any(|n| n.contains("stripped") && n.contains("module.")), "{:?}", p.notes);
    assert_eq!(detect(&sources.iter().map(|s| s.name.as_str()).collect::<Vec<_>>()).unwrap().name(), "mae");
}

#[test]
fn strip_collision_is_an_error() {
    let mut sources = mae_vit_b();
    sources.push(t("module.cls_token", &[1, 1, 768]));
    let msg = plan_err(mae(), &sources, &opts(None));
    assert!(msg.contains("module.cls_token") && msg.contains("'cls_token'"), "{msg}");
}

#[test]
fn f16_checkpoint_gets_f16_fills_and_init_values_override() {
    let sources: Vec<_> = mae_vit_b()
        .into_iter()
        .map(|mut s| {
            s.dtype = DType::F16;
            s
        })
        .collect();
    let o = PlanOptions { img_size: Some(512), init_values: Some(0.1), ..Default::default() };
    let p = plan(mae(), &sources, &o).unwrap();
    assert_eq!(out(&p, "layers.0.gamma_1").dtype, DType::F16);
    assert_eq!(out(&p, "layers.0.gamma_1").origin, Origin::Fill { value: 0.1 });
    assert_eq!(out(&p, "layers.0.attn.relative_position_bias_table").dtype, DType::F16);
    assert_eq!(out(&p, "layers.0.attn.relative_position_index").dtype, DType::I64);
    assert_eq!(out(&p, "pos_embed").dtype, DType::F16);
}

#[test]
fn mae_large_and_huge_presets() {
    let p = plan(mae(), &mae_encoder(1024, 24, 14, 16, true), &opts(Some(512))).unwrap();
    assert_eq!(p.vars["heads"], 16);
    assert_eq!(out(&p, "layers.23.attn.relative_position_bias_table").shape, [3972, 16]);
    // ViT-H/14: 224/14 = 16 grid; 518/14 = 37.
    let p = plan(mae(), &mae_encoder(1280, 32, 16, 14, true), &opts(Some(518))).unwrap();
    assert_eq!(p.vars["heads"], 16);
    assert_eq!(out(&p, "pos_embed").shape, [1, 37 * 37 + 1, 1280]);
    assert_eq!(out(&p, "patch_embed.projection.weight").shape, [1280, 3, 14, 14]);
}

// ---------------------------------------------------------------------------------------
// BEiT

#[test]
fn beit_pretrain_clean_expands_the_shared_table() {
    let p = plan(beit(), &beit_b_pretrain(), &opts(None)).unwrap();
    assert_eq!(targets(&p), without(mmseg_beit_keys(12), &["relative_position_index"]));
    for i in 0..12 {
        let table = out(&p, &format!("layers.{i}.attn.relative_position_bias_table"));
        assert_eq!(table.shape, [732, 12]);
        assert_eq!(table.origin, Origin::Expand { source: "rel_pos_bias.relative_position_bias_table".into() });
    }
    let rules: Vec<(&str, &str)> = p.dropped.iter().map(|d| (d.source.as_str(), d.rule.as_str())).collect();
    assert_eq!(
        rules,
        [
            ("mask_token", "pretrain-head"),
            ("rel_pos_bias.relative_position_index", "shared-rel-index"),
            ("norm.weight", "final-norm"),
            ("norm.bias", "final-norm"),
            ("lm_head.weight", "pretrain-head"),
            ("lm_head.bias", "pretrain-head"),
        ]
    );
    assert_eq!(p.vars["src_window"], 14);
    assert_eq!(p.vars["heads"], 12);
    assert!(!targets(&p).iter().any(|k| k.contains("qkv.bias")));
    let fates = p.source_fates();
    let shared = fates.iter().find(|f| f.source == "rel_pos_bias.relative_position_bias_table").unwrap();
    match &shared.fate {
        Fate::Produces(outs) => assert_eq!(outs.len(), 12),
        Fate::Dropped(_) => panic!("shared table dropped"),
    }
}

#[test]
fn beit_pretrain_load_ready_640() {
    let p = plan(beit(), &beit_b_pretrain(), &opts(Some(640))).unwrap();
    assert_eq!(targets(&p), mmseg_beit_keys(12));
    let table = out(&p, "layers.5.attn.relative_position_bias_table");
    assert_eq!(table.shape, [6244, 12]);
    assert_eq!(
        table.origin,
        Origin::ResizeRelPosTable {
            source: "rel_pos_bias.relative_position_bias_table".into(),
            src_window: 14,
            dst_window: 40,
            num_heads: 12
        }
    );
    let index = out(&p, "layers.5.attn.relative_position_index");
    assert_eq!(index.shape, [1601, 1601]);
    assert_eq!(index.origin, Origin::RelPosIndex { window: 40 });
    // gamma comes from the checkpoint, not from a fill.
    assert_eq!(out(&p, "layers.5.gamma_1").origin, Origin::Rename { source: "blocks.5.gamma_1".into() });
    assert!(p.generated().all(|o| matches!(o.origin, Origin::RelPosIndex { .. })));
}

#[test]
fn beitv2_pretrain_drops_cls_pt_layers() {
    let p = plan(beit(), &beitv2_b_pretrain(), &opts(Some(512))).unwrap();
    assert_eq!(targets(&p), mmseg_beit_keys(12));
    let cls_pt: Vec<_> = p.dropped.iter().filter(|d| d.rule == "beitv2-cls-pretrain").collect();
    assert_eq!(cls_pt.len(), 7);
    assert_eq!(out(&p, "layers.0.attn.relative_position_bias_table").shape, [3972, 12]);
}

#[test]
fn beit_finetuned_clean_renames_per_layer_tables_and_indices() {
    let p = plan(beit(), &beit_finetuned(768, 12, 12, 14), &opts(None)).unwrap();
    assert_eq!(targets(&p), mmseg_beit_keys(12));
    assert_eq!(
        out(&p, "layers.2.attn.relative_position_index").origin,
        Origin::Rename { source: "blocks.2.attn.relative_position_index".into() }
    );
    assert_eq!(out(&p, "layers.2.attn.relative_position_index").dtype, DType::I64);
    assert_eq!(out(&p, "layers.2.attn.relative_position_index").shape, [197, 197]);
    assert_eq!(p.dropped.len(), 4);
}

#[test]
fn beit_finetuned_224_to_640_resizes_tables_and_regenerates_indices() {
    let p = plan(beit(), &beit_finetuned(768, 12, 12, 14), &opts(Some(640))).unwrap();
    assert_eq!(targets(&p), mmseg_beit_keys(12));
    for i in 0..12 {
        let table = out(&p, &format!("layers.{i}.attn.relative_position_bias_table"));
        assert_eq!(table.shape, [6244, 12]);
        assert_eq!(
            table.origin,
            Origin::ResizeRelPosTable {
                source: format!("blocks.{i}.attn.relative_position_bias_table"),
                src_window: 14,
                dst_window: 40,
                num_heads: 12
            }
        );
        assert_eq!(out(&p, &format!("layers.{i}.attn.relative_position_index")).shape, [1601, 1601]);
    }
    let regenerated = p.dropped.iter().filter(|d| d.rule == "rel-index-regenerate").count();
    assert_eq!(regenerated, 12);
    assert_eq!(p.vars["dst_window"], 40);
}

#[test]
fn beit_large_finetuned() {
    let p = plan(beit(), &beit_finetuned(1024, 24, 16, 14), &opts(Some(640))).unwrap();
    assert_eq!(targets(&p), mmseg_beit_keys(24));
    assert_eq!(out(&p, "layers.23.attn.relative_position_bias_table").shape, [6244, 16]);
}

#[test]
fn beit_pos_embed_is_dropped_with_a_warning() {
    let mut sources = beit_finetuned(768, 12, 12, 14);
    sources.insert(1, t("pos_embed", &[1, 197, 768]));
    let p = plan(beit(), &sources, &opts(None)).unwrap();
    let d = p.dropped.iter().find(|d| d.source == "pos_embed").unwrap();
    assert_eq!(d.rule, "abs-pos-embed");
    assert!(d.reason.contains("no pos_embed"));
    assert!(p.notes.iter().any(|n| n.starts_with("WARNING") && n.contains("pos_embed")), "{:?}", p.notes);
    assert!(!targets(&p).contains(&"pos_embed".to_string()));
}

#[test]
fn beit_without_layer_scale_gets_filled_gammas_when_load_ready() {
    let sources: Vec<_> = beit_finetuned(768, 12, 12, 14).into_iter().filter(|s| !s.name.contains("gamma")).collect();
    let p = plan(beit(), &sources, &opts(None)).unwrap();
    assert!(!targets(&p).iter().any(|k| k.contains("gamma")));
    let p = plan(beit(), &sources, &opts(Some(224))).unwrap();
    assert_eq!(targets(&p), mmseg_beit_keys(12));
    assert_eq!(out(&p, "layers.0.gamma_2").origin, Origin::Fill { value: 1.0 });
    // Same window: tables copied, not resized.
    assert_eq!(
        out(&p, "layers.0.attn.relative_position_bias_table").origin,
        Origin::Rename { source: "blocks.0.attn.relative_position_bias_table".into() }
    );
}

// ---------------------------------------------------------------------------------------
// The tiny fixture model: dim 32, depth 4, 2 heads, img 112 (grid 7).

#[test]
fn tiny_mae_plans_with_num_heads() {
    let sources = mae_encoder(32, 4, 7, 16, true);
    let p = plan(mae(), &sources, &opts(None)).unwrap();
    assert!(!p.vars.contains_key("heads"));
    let o = PlanOptions { img_size: Some(112), num_heads: Some(2), ..Default::default() };
    let p = plan(mae(), &sources, &o).unwrap();
    assert_eq!(targets(&p), mmseg_mae_keys(4));
    assert_eq!(out(&p, "pos_embed").shape, [1, 50, 32]);
    assert_eq!(out(&p, "pos_embed").origin, Origin::Rename { source: "pos_embed".into() });
    assert_eq!(out(&p, "layers.3.attn.relative_position_bias_table").shape, [172, 2]);
    assert_eq!(out(&p, "layers.3.attn.relative_position_index").shape, [50, 50]);
    let o = PlanOptions { img_size: Some(224), num_heads: Some(2), ..Default::default() };
    let p = plan(mae(), &sources, &o).unwrap();
    assert_eq!(out(&p, "pos_embed").shape, [1, 197, 32]);
    assert_eq!(
        out(&p, "pos_embed").origin,
        Origin::ResizeAbsPosEmbed { source: "pos_embed".into(), num_extra: 1, old_grid: 7, new_grid: 14 }
    );
}

#[test]
fn tiny_mae_without_num_heads_asks_for_it() {
    let msg = plan_err(mae(), &mae_encoder(32, 4, 7, 16, true), &opts(Some(112)));
    assert!(msg.contains("--num-heads") && msg.contains("32"), "{msg}");
}

#[test]
fn tiny_beit_takes_heads_from_its_table() {
    let sources = beit_finetuned(32, 4, 2, 7);
    let p = plan(beit(), &sources, &opts(Some(112))).unwrap();
    assert_eq!(targets(&p), mmseg_beit_keys(4));
    assert_eq!(p.vars["heads"], 2);
    assert_eq!(out(&p, "layers.0.attn.relative_position_bias_table").shape, [172, 2]);
    let p = plan(beit(), &beit_pretrain(32, 4, 2, 7), &opts(Some(224))).unwrap();
    assert_eq!(out(&p, "layers.3.attn.relative_position_bias_table").shape, [732, 2]);
    let msg = plan_err(beit(), &sources, &PlanOptions { num_heads: Some(4), ..opts(None) });
    assert!(msg.contains("table_heads == heads") && msg.contains("table_heads = 2"), "{msg}");
}

// ---------------------------------------------------------------------------------------
// keep_unused

#[test]
fn keep_unused_passes_dropped_keys_through() {
    let o = PlanOptions { keep_unused: true, ..Default::default() };
    let p = plan(mae(), &mae_vit_b_full(), &o).unwrap();
    assert!(p.dropped.is_empty());
    let kept = out(&p, "decoder_pred.weight");
    assert_eq!(kept.origin, Origin::Keep { source: "decoder_pred.weight".into() });
    assert!(kept.rule.contains("keep_unused") && kept.rule.contains("decoder"), "{}", kept.rule);
    assert_eq!(out(&p, "norm.weight").shape, [768]);
    // The backbone keys come first, unchanged.
    let n = without(mmseg_mae_keys(12), &LAYER_ONLY_FROM_TABLES).len();
    assert_eq!(targets(&p)[..n], without(mmseg_mae_keys(12), &LAYER_ONLY_FROM_TABLES)[..]);
    assert_eq!(p.outputs.len(), mae_vit_b_full().len());
}

#[test]
fn keep_unused_collision_is_an_error() {
    let table = MappingTable::parse(
        r#"
name = "t"
description = "test"
[[rule]]
id = "a-to-b"
match = 'a'
rename = "b"
[[rule]]
id = "drop-b"
match = 'b'
drop = "unused"
"#,
        "test.toml",
    )
    .unwrap();
    let sources = [t("a", &[1]), t("b", &[1])];
    let p = plan(&table, &sources, &opts(None)).unwrap();
    assert_eq!(targets(&p), ["b"]);
    let msg = plan_err(&table, &sources, &PlanOptions { keep_unused: true, ..Default::default() });
    assert!(msg.contains("keep_unused") && msg.contains("'b'"), "{msg}");
}

// ---------------------------------------------------------------------------------------
// Detection and built-ins

#[test]
fn builtin_tables_are_listed() {
    let names: Vec<&str> = builtin_tables().iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "mae",
            "beit",
            "hf-vitmae",
            "hf-beit",
            "mmpretrain-mae",
            "mmpretrain-beit",
            "mmseg-mae",
            "mmseg-beit",
            "mmseg-segmentor"
        ]
    );
    assert!(builtin_tables().iter().all(|(_, d)| !d.is_empty()));
    let msg = MappingTable::builtin("vit").unwrap_err().to_string();
    assert!(msg.contains("'vit'") && msg.contains("mae, beit"), "{msg}");
    assert_eq!(mae().containers(), ["state_dict", "model", "module", ""]);
    assert_eq!(mae().unknown_keys(), UnknownKeys::Error);
}

fn names(sources: &[SourceTensor]) -> Vec<String> {
    sources.iter().map(|s| s.name.clone()).collect()
}

#[test]
fn detection_picks_the_family() {
    assert_eq!(detect(&names(&mae_vit_b())).unwrap().name(), "mae");
    assert_eq!(detect(&names(&mae_vit_b_full())).unwrap().name(), "mae");
    assert_eq!(detect(&names(&mae_vit_b_finetuned())).unwrap().name(), "mae");
    assert_eq!(detect(&names(&beit_b_pretrain())).unwrap().name(), "beit");
    assert_eq!(detect(&names(&beitv2_b_pretrain())).unwrap().name(), "beit");
    assert_eq!(detect(&names(&beit_finetuned(768, 12, 12, 14))).unwrap().name(), "beit");
    let backbone: Vec<String> = names(&beit_finetuned(32, 4, 2, 7)).iter().map(|n| format!("backbone.{n}")).collect();
    assert_eq!(detect(&backbone).unwrap().name(), "beit");
}

#[test]
fn detection_rejects_an_unrelated_checkpoint() {
    let resnet = ["conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "fc.weight"];
    let e = detect(&resnet).unwrap_err();
    assert!(matches!(e, TableError::NoTableMatches { .. }));
    let msg = e.to_string();
    assert!(msg.contains("mae:") && msg.contains("beit:") && !msg.contains('\n'), "{msg}");
    // The "mae" fingerprint refuses a BEiT key set for a stated reason.
    let why = mae().recognises(&names(&beit_b_pretrain())).unwrap_err();
    assert!(why.contains("qkv"), "{why}");
}

#[test]
fn detection_with_several_matches_names_them() {
    let a = MappingTable::parse("name = \"a\"\ndescription = \"x\"\n[detect]\nrequire = ['w']\n", "a.toml").unwrap();
    let b = MappingTable::parse("name = \"b\"\ndescription = \"x\"\n[detect]\nrequire = ['w']\n", "b.toml").unwrap();
    let msg = detect_among([&a, &b], &["w"]).unwrap_err().to_string();
    assert!(msg.contains("a, b") && msg.contains("several"), "{msg}");
    assert_eq!(detect_among([&a, mae()], &["w"]).unwrap().name(), "a");
}

// ---------------------------------------------------------------------------------------
// Planning errors

#[test]
fn uncovered_source_key_is_an_error() {
    let mut sources = mae_vit_b();
    sources.push(t("blocks.0.attn.extra_thing", &[3]));
    let msg = plan_err(mae(), &sources, &opts(None));
    assert!(msg.contains("'blocks.0.attn.extra_thing'") && msg.contains("'mae'"), "{msg}");
}

#[test]
fn two_sources_onto_one_target_is_an_error() {
    // Shared and per-layer tables at once.
    let mut sources = beit_finetuned(768, 12, 12, 14);
    sources.push(t("rel_pos_bias.relative_position_bias_table", &[732, 12]));
    let msg = plan_err(beit(), &sources, &opts(None));
    assert!(
        msg.contains("'layers.0.attn.relative_position_bias_table'")
            && msg.contains("block-attn")
            && msg.contains("shared-rel-table"),
        "{msg}"
    );
}

#[test]
fn missing_target_is_an_error() {
    let sources: Vec<_> = mae_vit_b().into_iter().filter(|s| s.name != "blocks.3.attn.qkv.weight").collect();
    let msg = plan_err(mae(), &sources, &opts(None));
    assert!(msg.contains("'layers.3.attn.qkv.weight'") && msg.contains("required"), "{msg}");
    // BEiT without q/v biases.
    let sources: Vec<_> = beit_finetuned(768, 12, 12, 14).into_iter().filter(|s| !s.name.ends_with("q_bias")).collect();
    let msg = plan_err(beit(), &sources, &opts(None));
    assert!(msg.contains("'layers.0.attn.q_bias'") && msg.contains("11 more"), "{msg}");
}

#[test]
fn qkv_shape_contradiction_is_an_error() {
    let mut sources = mae_vit_b();
    let qkv = sources.iter_mut().find(|s| s.name == "blocks.2.attn.qkv.weight").unwrap();
    qkv.shape = vec![2304, 700];
    let msg = plan_err(mae(), &sources, &opts(None));
    assert!(
        msg.contains("'blocks.2.attn.qkv.weight'")
            && msg.contains("block-attn")
            && msg.contains("[2304, 768]")
            && msg.contains("3 * dim, dim"),
        "{msg}"
    );
}

#[test]
fn table_rows_not_a_window_are_an_error() {
    // Layer 0 decides the window: 730 − 3 is not a perfect square.
    let mut sources = beit_finetuned(768, 12, 12, 14);
    for s in sources.iter_mut().filter(|s| s.name.ends_with("bias_table")) {
        s.shape = vec![730, 12];
    }
    for o in [opts(None), opts(Some(512))] {
        let msg = plan_err(beit(), &sources, &o);
        assert!(
            msg.contains("src_window")
                && msg.contains("blocks.0.attn.relative_position_bias_table")
                && msg.contains("727 is not a perfect square"),
            "{msg}"
        );
    }
    // An even square root: 4² + 3 rows is no (2W−1)² + 3.
    let mut sources = beit_b_pretrain();
    sources.iter_mut().find(|s| s.name.ends_with("bias_table")).unwrap().shape = vec![19, 12];
    let msg = plan_err(beit(), &sources, &opts(None));
    assert!(msg.contains("src_window") && msg.contains("not a whole number"), "{msg}");
    // One layer out of step with the others, in both modes.
    let mut sources = beit_finetuned(768, 12, 12, 14);
    sources.iter_mut().find(|s| s.name == "blocks.5.attn.relative_position_bias_table").unwrap().shape = vec![3972, 12];
    let msg = plan_err(beit(), &sources, &opts(None));
    assert!(msg.contains("'blocks.5.attn.relative_position_bias_table'") && msg.contains("block-attn"), "{msg}");
    let msg = plan_err(beit(), &sources, &opts(Some(640)));
    assert!(
        msg.contains("'blocks.5.attn.relative_position_bias_table'")
            && msg.contains("rel-table-resize")
            && msg.contains("[732, 12]"),
        "{msg}"
    );
}

#[test]
fn img_size_not_a_multiple_of_the_patch_is_an_error() {
    let msg = plan_err(mae(), &mae_vit_b(), &opts(Some(500)));
    assert!(msg.contains("500 / 16") && msg.contains("dst_grid"), "{msg}");
    let msg = plan_err(mae(), &mae_vit_b(), &opts(Some(0)));
    assert!(msg.contains("img_size"), "{msg}");
}

#[test]
fn non_contiguous_blocks_are_an_error() {
    let sources: Vec<_> = mae_vit_b().into_iter().filter(|s| !s.name.starts_with("blocks.4.")).collect();
    let msg = plan_err(mae(), &sources, &opts(None));
    assert!(msg.contains("depth") && msg.contains("0..11"), "{msg}");
}

// ---------------------------------------------------------------------------------------
// Table format

#[test]
fn captures_are_written_with_braces() {
    let table = MappingTable::parse(
        r#"
name = "t"
description = "test"
unknown_keys = "drop"
[[rule]]
match = 'enc\.(\d+)\.(w|b)'
rename = "layers.${1}.${2}x"
[[rule]]
match = 'stem\.(?P<part>conv|bn)'
rename = "stem_${part}"
"#,
        "test.toml",
    )
    .unwrap();
    let sources = [t("enc.3.w", &[2]), t("stem.bn", &[2]), t("other", &[1])];
    let p = plan(&table, &sources, &opts(None)).unwrap();
    assert_eq!(targets(&p), ["layers.3.wx", "stem_bn"]);
    assert_eq!(p.outputs[0].rule, "#1");
    assert_eq!(p.dropped.len(), 1);
    assert_eq!(p.dropped[0].rule, "(no rule)");
    let fates = p.source_fates();
    assert_eq!(fates.len(), 3);
    assert!(matches!(fates[2].fate, Fate::Dropped(_)));
}

#[test]
fn first_match_wins_without_chaining() {
    let table = MappingTable::parse(
        r#"
name = "t"
description = "test"
[[rule]]
id = "specific"
match = 'a\.norm'
rename = "a.ln"
[[rule]]
id = "general"
match = 'a\..*'
rename = "b.x"
[[rule]]
id = "after"
match = 'a\.ln'
rename = "never"
"#,
        "test.toml",
    )
    .unwrap();
    let p = plan(&table, &[t("a.norm", &[1]), t("a.other", &[1])], &opts(None)).unwrap();
    assert_eq!(targets(&p), ["a.ln", "b.x"]);
    assert_eq!(p.outputs[0].rule, "specific");
}

#[test]
fn table_errors_name_the_rule() {
    let base = "name = \"t\"\ndescription = \"test\"\n";
    // Each table, and what its one-line error must say (the rule, variable or line).
    let cases: [(String, &[&str]); 15] = [
        (format!("{base}[[rule]]\nid = \"r1\"\nmatch = 'blocks\\.(\\d+'\nrename = \"x\"\n"), &["rule 'r1'", "invalid regex", "test.toml"]),
        (format!("{base}[[rule]]\nid = \"r2\"\nmatch = 'x'\nrename = \"y\"\ntransform = {{ name = \"resize_everything\" }}\n"), &["rule 'r2'", "unknown transform 'resize_everything'"]),
        (format!("{base}[[rule]]\nid = \"r3\"\nmatch = 'a\\.(\\d+)\\.(w)'\nrename = \"l.${{3}}\"\n"), &["rule 'r3'", "${3}", "2 capture group"]),
        (format!("{base}[[rule]]\nid = \"r4\"\nmatch = 'a\\.(\\d+)'\nrename = \"l.$1x\"\n"), &["rule 'r4'", "${1}"]),
        (format!("{base}[[rule]]\nid = \"r5\"\nmatch = 'a'\nrename = \"b\"\ndrop = \"c\"\n"), &["rule 'r5'", "exactly one"]),
        (format!("{base}[[rule]]\nid = \"r6\"\nmatch = 'a'\ndrop = \"\"\n"), &["rule 'r6'", "reason"]),
        (format!("{base}[[rule]]\nid = \"r7\"\nmatch = 'a'\nrename = \"b\"\ntransform = {{ name = \"resize_abs_pos_embed\", num_extra = 1, old_grid = 2 }}\n"), &["rule 'r7'", "missing parameter 'new_grid'"]),
        (format!("{base}[[rule]]\nid = \"r8\"\nmatch = 'a'\nrename = \"b\"\ntransform = {{ name = \"fill\", value = 1.0 }}\n"), &["rule 'r8'", "make"]),
        (format!("{base}[vars]\ndim = 'shape(\"x\", 0) * widht'\n"), &["variable 'dim'", "unknown variable 'widht'"]),
        (format!("{base}[vars]\na = 'b + 1'\nb = ['3 * a']\n"), &["depend on themselves", "a -> b -> a"]),
        (format!("{base}[vars]\na = 'shap(\"x\", 0)'\n"), &["unknown function 'shap'"]),
        (format!("{base}[[rule]]\nmatch = 'a'\nrenam = \"b\"\n"), &["line 5", "renam"]),
        (format!("{base}[[target]]\nkey = \"layers.{{i}}.w\"\nshape = [1]\n"), &["depth"]),
        (format!("{base}[[target]]\nkey = \"w\"\nshape = [1]\nmake = {{ name = \"zeros\" }}\n"), &["target 'w'", "unknown transform 'zeros'"]),
        ("format = 2\nname = \"t\"\ndescription = \"x\"\n".to_string(), &["format 2"]),
    ];
    for (text, needles) in &cases {
        let msg = table_err(text);
        for n in *needles {
            assert!(msg.contains(n), "no {n:?} in {msg}\n(table: {text:?})");
        }
    }
}

#[test]
fn not_a_target_is_an_error() {
    let table = MappingTable::parse(
        r#"
name = "t"
description = "test"
[vars]
dim = 'shape("w", 0)'
[[rule]]
id = "w"
match = 'w'
keep = true
[[rule]]
id = "stray"
match = 'v'
rename = "vv"
[[target]]
key = "w"
shape = ["dim"]
"#,
        "test.toml",
    )
    .unwrap();
    plan(&table, &[t("w", &[4])], &opts(None)).unwrap();
    let msg = plan_err(&table, &[t("w", &[4]), t("v", &[4])], &opts(None));
    assert!(msg.contains("rule 'stray'") && msg.contains("'vv'") && msg.contains("not in the target set"), "{msg}");
}

#[test]
fn plan_serializes_to_json() {
    let p = plan(beit(), &beit_b_pretrain(), &opts(Some(512))).unwrap();
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["table"], "beit");
    assert_eq!(json["vars"]["dst_window"], 32);
    let table = json["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["target"] == "layers.0.attn.relative_position_bias_table")
        .unwrap();
    assert_eq!(table["origin"]["kind"], "resize_rel_pos_table");
    assert_eq!(table["origin"]["dst_window"], 32);
    assert_eq!(table["dtype"], "f32");
    assert!(json.get("sources").is_none());
}

#[test]
fn dry_run_fates_cover_every_source() {
    let sources = beit_finetuned(768, 12, 12, 14);
    let p = plan(beit(), &sources, &opts(Some(640))).unwrap();
    let fates = p.source_fates();
    assert_eq!(fates.len(), sources.len());
    for (f, s) in fates.iter().zip(&sources) {
        assert_eq!(f.source, s.name);
        match &f.fate {
            Fate::Produces(outs) => assert!(!outs.is_empty(), "{} produces nothing", s.name),
            Fate::Dropped(d) => assert!(!d.reason.is_empty()),
        }
    }
    let index = fates.iter().find(|f| f.source == "blocks.0.attn.relative_position_index").unwrap();
    assert!(matches!(&index.fate, Fate::Dropped(d) if d.rule == "rel-index-regenerate"));
    let shown = out(&p, "layers.0.attn.relative_position_bias_table").origin.to_string();
    assert!(shown.contains("window 14 to 40"), "{shown}");
}

#[test]
fn plan_errors_are_typed() {
    let e = plan(mae(), &[t("x", &[1])], &opts(None)).unwrap_err();
    assert!(matches!(e, PlanError::UncoveredKey { .. }));
}

/// `fixtures/mmseg_vit_b_512_keys.json` (written independently in fixtures/make_fixtures.py):
/// names, shapes and order of the MMSeg MAE and BEiT ViT-B backbones at 512.
#[test]
fn load_ready_vit_b_512_matches_the_fixture_key_lists() {
    let path = fixture("mmseg_vit_b_512_keys.json");
    if !path.is_file() {
        eprintln!("skipped: {} not present", path.display());
        return;
    }
    let expected = mmseg_vit_b_512_keys;
    let got = |p: &Plan| -> Vec<(String, Vec<usize>)> {
        p.outputs.iter().map(|o| (o.target.clone(), o.shape.clone())).collect()
    };
    assert_eq!(got(&plan(mae(), &mae_vit_b(), &opts(Some(512))).unwrap()), expected("mae"));
    assert_eq!(got(&plan(mae(), &mae_vit_b_finetuned(), &opts(Some(512))).unwrap()), expected("mae"));
    assert_eq!(got(&plan(beit(), &beit_b_pretrain(), &opts(Some(512))).unwrap()), expected("beit"));
    assert_eq!(got(&plan(beit(), &beit_finetuned(768, 12, 12, 14), &opts(Some(512))).unwrap()), expected("beit"));
}

/// The worked example in mappings/README.md parses and does what the README says.
#[test]
fn readme_worked_example_works() {
    let readme = include_str!("../../mappings/README.md");
    let start =
        readme.find("```toml\nformat = 1\nname = \"deit3\"").expect("worked example present") + "```toml\n".len();
    let text = &readme[start..start + readme[start..].find("```").unwrap()];
    let table = MappingTable::parse(text, "README.md#deit3").unwrap();
    let (dim, depth) = (384, 12);
    let mut sources = vec![
        t("cls_token", &[1, 1, dim]),
        t("pos_embed", &[1, 197, dim]),
        t("patch_embed.proj.weight", &[dim, 3, 16, 16]),
        t("patch_embed.proj.bias", &[dim]),
    ];
    for i in 0..depth {
        for (k, s) in [
            ("norm1.weight", vec![dim]),
            ("norm1.bias", vec![dim]),
            ("attn.qkv.weight", vec![3 * dim, dim]),
            ("attn.qkv.bias", vec![3 * dim]),
            ("attn.proj.weight", vec![dim, dim]),
            ("attn.proj.bias", vec![dim]),
            ("ls1.gamma", vec![dim]),
            ("norm2.weight", vec![dim]),
            ("norm2.bias", vec![dim]),
            ("mlp.fc1.weight", vec![4 * dim, dim]),
            ("mlp.fc1.bias", vec![4 * dim]),
            ("mlp.fc2.weight", vec![dim, 4 * dim]),
            ("mlp.fc2.bias", vec![dim]),
            ("ls2.gamma", vec![dim]),
        ] {
            sources.push(t(&format!("blocks.{i}.{k}"), &s));
        }
    }
    for (k, s) in [
        ("norm.weight", vec![dim]),
        ("norm.bias", vec![dim]),
        ("head.weight", vec![1000, dim]),
        ("head.bias", vec![1000]),
    ] {
        sources.push(t(k, &s));
    }
    let p = plan(&table, &sources, &opts(None)).unwrap();
    assert_eq!(out(&p, "layers.3.gamma_2").origin, Origin::Rename { source: "blocks.3.ls2.gamma".into() });
    assert_eq!(p.dropped.len(), 4);
    assert!(p.dropped.iter().all(|d| d.rule == "classifier"));
    let p = plan(&table, &sources, &opts(Some(512))).unwrap();
    assert_eq!(targets(&p), mmseg_mae_keys(12));
    assert_eq!(out(&p, "pos_embed").shape, [1, 1025, dim]);
    assert_eq!(out(&p, "layers.0.attn.relative_position_bias_table").shape, [3972, 6]);
    assert_eq!(out(&p, "layers.0.attn.relative_position_index").shape, [1025, 1025]);
    let no_scale: Vec<_> = sources.iter().filter(|s| !s.name.contains(".ls")).cloned().collect();
    let msg = plan_err(&table, &no_scale, &opts(None));
    assert!(
        msg.contains("target 'layers.0.gamma_1'") && msg.contains("is required, but no source key produces it"),
        "{msg}"
    );
}
