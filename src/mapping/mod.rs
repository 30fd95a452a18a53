//! Declarative mapping tables: TOML text + a checkpoint's names and shapes in, a `Plan` out.
//! Pure: no I/O, no tensor data (transforms are pure functions on tensor values).
//!
//! - [`table`]: the compiled table model (see `mappings/README.md`), the built-in tables and
//!   family detection;
//! - `compile`: TOML text → a checked [`MappingTable`]; `template` (`${1}`, `{i}`) and `expr`
//!   (the expression language) are the two small languages it compiles;
//! - [`plan`]: applying a table to a checkpoint's names/shapes → [`Plan`];
//! - `transforms`: the numeric transforms a plan names (executed by the converter).

mod compile;
pub(crate) mod expr;
pub mod plan;
pub mod table;
pub(crate) mod template;
pub mod transforms;

pub use plan::{plan, DroppedKey, Fate, Origin, Plan, PlanError, PlanOptions, PlannedTensor, SourceFate, SourceTensor};
pub use table::{builtin_table_text, builtin_tables, detect, detect_among, Fingerprint, MappingTable, TableError};
