//! Fuzz the RESP command parser: any input parses, asks for more, or fails
//! with an error, never panics; a parsed command's length is within the input,
//! an incomplete one asks for more than it has, and parsing the same bytes split
//! in two (as two reads would deliver them) gives the same commands.

#![no_main]

use dkvs::protocol::resp::{RespDecoded, decode_command};
use libfuzzer_sys::fuzz_target;

const MAX_BULK: usize = 4096;

/// Every command parsed from the front of `input` (args copied), and how the stream ended.
fn parse_stream(input: &[u8]) -> (Vec<Vec<Vec<u8>>>, usize, bool) {
    let mut at = 0;
    let mut commands = Vec::new();
    // Each command consumes at least one byte, so this is bounded by the input length.
    while at < input.len() {
        let mut scratch = Vec::new();
        match decode_command(&input[at..], MAX_BULK, &mut scratch) {
            Ok(RespDecoded::Command { args, used }) => {
                assert!(used > 0 && used <= input.len() - at);
                commands.push(args.iter().map(|a| a.to_vec()).collect());
                at += used;
            }
            Ok(RespDecoded::Incomplete { need }) => {
                assert!(need > input.len() - at);
                return (commands, at, false);
            }
            Err(_) => return (commands, at, true),
        }
    }
    (commands, at, false)
}

fuzz_target!(|data: &[u8]| {
    let (whole, consumed, failed) = parse_stream(data);
    if failed || data.is_empty() {
        return;
    }
    // Feed the same bytes as two reads: the commands must be the same.
    let cut = data[0] as usize % data.len();
    let (first, _, first_failed) = parse_stream(&data[..cut]);
    if first_failed {
        return;
    }
    let mut buffer: Vec<u8> = Vec::new();
    let mut commands = Vec::new();
    for chunk in [&data[..cut], &data[cut..]] {
        buffer.extend_from_slice(chunk);
        loop {
            let mut scratch = Vec::new();
            match decode_command(&buffer, MAX_BULK, &mut scratch) {
                Ok(RespDecoded::Command { args, used }) => {
                    commands.push(args.iter().map(|a| a.to_vec()).collect::<Vec<_>>());
                    buffer.drain(..used);
                }
                _ => break,
            }
        }
    }
    assert!(first.len() <= whole.len());
    assert_eq!(
        commands,
        whole,
        "split at {cut} of {} (consumed {consumed})",
        data.len()
    );
});
