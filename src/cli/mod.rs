//! The `ckptmap` command line, over the library: [`args`] defines it, [`commands`] runs it,
//! [`render`] prints results as text, [`bars`] draws progress. Only this module (and
//! `main.rs`, which dispatches) prints or exits.

pub(crate) mod args;
pub(crate) mod bars;
pub(crate) mod commands;
pub(crate) mod render;
