//! Cross-service system tests live in this package's `[[test]]` targets.
