//! The JSON bodies of every command, parsed as the services' extractors parse them
//! (`services::http::parse_every_command_body`). Finding: a panic, a stack overflow or
//! an allocation beyond libFuzzer's limit; a refusal is the expected answer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = services::http::parse_every_command_body(data);
});
