pub mod pickle;
