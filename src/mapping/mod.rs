//! Declarative mapping tables: TOML text + a checkpoint's names and shapes in, a `Plan` out.
//! Pure: no I/O, no tensor data (transforms are pure functions on tensor values).

pub mod transforms;
