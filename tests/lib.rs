//! Cross-service system tests live in this package's `[[test]]` targets.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]
