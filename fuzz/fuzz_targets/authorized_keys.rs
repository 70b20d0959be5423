//! The authorized_keys parser on arbitrary text: a list or an error with a line number,
//! never a panic.
#![no_main]

use dst::server::auth::AuthorizedKeys;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match AuthorizedKeys::parse(text) {
        Ok(keys) => assert!(keys.len() <= text.lines().count()),
        Err(e) => assert!(e.starts_with("line "), "{e}"),
    }
});
