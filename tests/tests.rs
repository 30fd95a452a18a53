//! The one integration-test crate (ripgrep's shape): every topic is a module of this binary,
//! so the test suite links candle, reqwest and the library once instead of once per topic.
//! The topics live in `tests/suite/`; a `.rs` file directly in `tests/` would make Cargo
//! build (and link) another test binary, so this is the only one.
//!
//! What the topics share (the fixture locator, the `ckptmap` binary runner, the loopback
//! HTTP server, the pickle builder) is in `tests/suite/util/`.
//!
//! Run one topic with `cargo test --test tests fetch::`, one test by its full name.

#[path = "suite/util/mod.rs"]
mod util;

#[path = "suite/batch.rs"]
mod batch;
#[path = "suite/cli.rs"]
mod cli;
#[path = "suite/corpus.rs"]
mod corpus;
#[path = "suite/fetch.rs"]
mod fetch;
#[path = "suite/first_hour.rs"]
mod first_hour;
#[path = "suite/fixtures_read.rs"]
mod fixtures_read;
#[path = "suite/format_errors.rs"]
mod format_errors;
#[path = "suite/fuzz_regressions.rs"]
mod fuzz_regressions;
#[path = "suite/interrupt.rs"]
mod interrupt;
#[path = "suite/layouts.rs"]
mod layouts;
#[path = "suite/mapping.rs"]
mod mapping;
#[path = "suite/readme.rs"]
mod readme;
#[path = "suite/segmentor.rs"]
mod segmentor;
#[path = "suite/torch_corpus.rs"]
mod torch_corpus;
#[path = "suite/verify_layouts.rs"]
mod verify_layouts;
