//! Loads, attaches and pins the kernel programs; writes the maps.
