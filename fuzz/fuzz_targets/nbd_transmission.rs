#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nbdcrypt_fuzz::nbd_transmission(data));
