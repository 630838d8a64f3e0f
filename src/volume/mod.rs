//! One encrypted volume.

pub mod luks2;
