//! One encrypted volume.
