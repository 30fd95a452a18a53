//! Helpers the topics share.
