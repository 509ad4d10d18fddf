//! A non-blocking TCP stream with an input buffer that frames are parsed from
//! and an output buffer that is flushed with as few system calls as possible.
//! Client connections and peer links both sit on it.
//!
//! The byte transport is a type parameter, a registered `mio` `TcpStream` by
//! default: the reactor keeps registering and deregistering the socket, and
//! unit tests put the real buffers, budgets and limits over an in-memory
//! transport (`testing::MemTransport`, test builds only) with no socket and
//! no timing. One type is compiled per transport, so the socket path pays
//! nothing for it.

use std::io::{self, Read, Write};
use std::rc::Rc;

use mio::net::TcpStream;

use crate::protocol::HEADER_LEN;

use super::limits::{Activity, InputBudget, Watch};

/// Starting (and resting) size of an input buffer: small, because every idle
/// connection holds one (a pipelined burst of small requests still fits).
const INPUT_BUFFER_BYTES: usize = 4 * 1024;
/// An idle output buffer larger than this is given back to the allocator; a
/// sent prefix larger than this is dropped from a buffer still being written.
const OUTPUT_KEEP_BYTES: usize = 64 * 1024;

/// What one `read` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    /// The peer closed its side.
    Eof,
    /// Fewer bytes than asked: the socket is drained, no second `read` is needed.
    Short,
    /// The buffer filled up: there may be more.
    Full,
    /// Nothing to read.
    WouldBlock,
}

/// A stream with its buffers, over transport `S` (a socket but in unit tests).
#[derive(Debug)]
pub struct Framed<S = TcpStream> {
    /// The socket, registered with the reactor.
    pub stream: S,
    input: Vec<u8>,
    /// Unparsed bytes are `input[in_start..in_end]`.
    in_start: usize,
    in_end: usize,
    /// Bytes the next frame needs, known once its header is in.
    frame_need: usize,
    /// Bytes to send are `output[out_start..]`.
    pub output: Vec<u8>,
    out_start: usize,
    /// The server-wide budget that input growth beyond the resting size is charged to.
    budget: Option<Rc<InputBudget>>,
    /// Bytes of `input` beyond `INPUT_BUFFER_BYTES` charged to `budget`.
    charged: usize,
    /// Bytes read since the stream opened.
    bytes_read: u64,
    /// Bytes written since the stream opened.
    bytes_written: u64,
    /// Frames consumed since the stream opened.
    frames_consumed: u64,
    /// What the periodic sweep last saw of this stream (timeouts).
    pub watch: Watch,
}

impl<S> Framed<S> {
    /// Wrap a connected stream.
    pub fn new(stream: S) -> Framed<S> {
        Framed {
            stream,
            input: vec![0; INPUT_BUFFER_BYTES],
            in_start: 0,
            in_end: 0,
            frame_need: HEADER_LEN,
            // Allocated by the first reply: an idle connection holds no output buffer.
            output: Vec::new(),
            out_start: 0,
            budget: None,
            charged: 0,
            bytes_read: 0,
            bytes_written: 0,
            frames_consumed: 0,
            watch: Watch::default(),
        }
    }

    /// Charge input growth to `budget` from now on (client connections).
    pub fn set_budget(&mut self, budget: Rc<InputBudget>) {
        debug_assert_eq!(self.charged, 0, "set before any growth");
        self.budget = Some(budget);
    }

    /// What the stream did, for the periodic sweep; `owes_replies` is the owner's.
    pub fn activity(&self, owes_replies: bool) -> Activity {
        let buffered = self.in_end - self.in_start;
        Activity {
            bytes_read: self.bytes_read,
            frames_consumed: self.frames_consumed,
            partial_frame: buffered > 0 && buffered < self.frame_need,
            owes_replies: owes_replies || self.pending_output() > 0,
        }
    }

    /// Bytes received and not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        &self.input[self.in_start..self.in_end]
    }

    /// The unconsumed input and the output buffer, borrowed together so that
    /// replies can be encoded while a frame borrowed from the input is in use.
    pub fn split(&mut self) -> (&[u8], &mut Vec<u8>) {
        (&self.input[self.in_start..self.in_end], &mut self.output)
    }

    /// Mark `n` buffered bytes as consumed.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.in_end - self.in_start);
        self.in_start += n;
        self.frames_consumed += 1;
        // The next frame's length is unknown until its header is parsed.
        self.frame_need = HEADER_LEN;
    }

    /// Record how many bytes the incomplete frame at the front needs in total
    /// (validated against the limits by the header parser, so growing to it is bounded).
    pub fn need(&mut self, frame_len: Option<usize>) {
        self.frame_need = frame_len.unwrap_or(HEADER_LEN);
    }

    /// Bytes read since the stream opened.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Bytes written since the stream opened (whether the other end drains).
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Bytes queued and not yet written.
    pub fn pending_output(&self) -> usize {
        self.output.len() - self.out_start
    }

    /// Once every buffered byte is consumed, start the buffer over, and give a
    /// grown one back to the allocator and its charge to the budget. Called
    /// before each read and at the end of each wake-up: a connection whose
    /// replies back up stops before its next read, and must not hold a grown
    /// buffer (no timeout applies to it: it holds no partial frame).
    pub fn settle(&mut self) {
        if self.in_start != self.in_end {
            return;
        }
        self.in_start = 0;
        self.in_end = 0;
        if self.input.len() > INPUT_BUFFER_BYTES && self.frame_need <= INPUT_BUFFER_BYTES {
            if let Some(budget) = &self.budget {
                budget.release(self.charged);
            }
            self.charged = 0;
            self.input.truncate(INPUT_BUFFER_BYTES);
            self.input.shrink_to_fit();
        }
    }

    /// Bytes the input buffer holds room for (allocated, whether used or not).
    #[cfg(test)]
    pub fn input_len(&self) -> usize {
        self.input.len()
    }
}

impl<S: Read + Write> Framed<S> {
    /// One `read` into the free end of the input buffer, making room first.
    ///
    /// The buffer grows only when it is full of bytes that arrived, by half its
    /// size (geometric, so copying stays amortised O(1) per byte) up to what
    /// the frame at the front needs: a declared length is a limit, never
    /// a size allocated up front, so a header announcing 1 MiB costs nothing
    /// until the bytes come. Growth beyond the resting size is charged to the
    /// server-wide budget; when that is spent the read fails and the stream closes.
    pub fn fill(&mut self) -> io::Result<Filled> {
        self.settle();
        let room_needed = self.frame_need.max(HEADER_LEN);
        if self.input.len() - self.in_start < room_needed || self.in_end == self.input.len() {
            self.input.copy_within(self.in_start..self.in_end, 0);
            self.in_end -= self.in_start;
            self.in_start = 0;
            if self.in_end == self.input.len() && self.input.len() < room_needed {
                let len = self.input.len();
                let grown = len.saturating_add(len / 2).min(room_needed);
                self.resize_input(grown)?;
            }
        }
        // Callers read only when the buffered bytes are less than one frame, so
        // there is room; were there none, the empty read would close the stream.
        debug_assert!(self.in_end < self.input.len());
        let space = self.input.len() - self.in_end;
        loop {
            return match self.stream.read(&mut self.input[self.in_end..]) {
                Ok(0) => Ok(Filled::Eof),
                Ok(n) => {
                    self.in_end += n;
                    self.bytes_read += n as u64;
                    Ok(if n < space {
                        Filled::Short
                    } else {
                        Filled::Full
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Filled::WouldBlock),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
        }
    }

    /// Resize the input buffer, keeping the budget's account of it.
    fn resize_input(&mut self, len: usize) -> io::Result<()> {
        let charge = len.saturating_sub(INPUT_BUFFER_BYTES);
        if let Some(budget) = &self.budget {
            if charge > self.charged {
                if !budget.try_charge(charge - self.charged) {
                    return Err(io::Error::other(format!(
                        "the server-wide budget for partial frames is spent \
                         ({} bytes held); a {}-byte frame cannot be buffered",
                        budget.used(),
                        self.frame_need
                    )));
                }
            } else {
                budget.release(self.charged - charge);
            }
            self.charged = charge;
        }
        self.input.resize(len, 0);
        Ok(())
    }

    /// Write queued bytes until done or the socket is full.
    pub fn flush(&mut self) -> io::Result<()> {
        while self.out_start < self.output.len() {
            match self.stream.write(&self.output[self.out_start..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out_start += n;
                    self.bytes_written += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // A reader that never quite catches up must not keep every byte
                    // ever sent: drop the sent prefix once it is the larger part.
                    // (Moving at most as much as was sent keeps this amortised O(1).)
                    if self.out_start >= OUTPUT_KEEP_BYTES
                        && 2 * self.out_start >= self.output.len()
                    {
                        self.output.drain(..self.out_start);
                        self.out_start = 0;
                    }
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.output.clear();
        self.out_start = 0;
        if self.output.capacity() > OUTPUT_KEEP_BYTES {
            self.output.shrink_to(OUTPUT_KEEP_BYTES);
        }
        Ok(())
    }
}

impl<S> Drop for Framed<S> {
    fn drop(&mut self) {
        if let Some(budget) = &self.budget {
            budget.release(self.charged);
        }
    }
}

/// An in-memory transport for unit tests of what sits on [`Framed`].
#[cfg(test)]
pub(super) mod testing {
    use std::collections::VecDeque;
    use std::io::{self, Read, Write};

    /// Bytes in, bytes out, no socket: reads return the queued bytes at most
    /// `read_chunk` at a time and `WouldBlock` when none are queued (EOF once
    /// `eof` is set and they are all read); writes take at most
    /// `write_capacity` more bytes, then `WouldBlock`, and keep what they took.
    #[derive(Debug)]
    pub struct MemTransport {
        incoming: VecDeque<u8>,
        /// Largest number of bytes one `read` returns.
        pub read_chunk: usize,
        /// The other end closed: a `read` of an empty queue returns 0.
        pub eof: bool,
        /// Bytes `write` still accepts before `WouldBlock`.
        pub write_capacity: usize,
        /// Every byte written.
        pub written: Vec<u8>,
        /// `read` calls, whatever they returned.
        pub reads: usize,
        /// `write` calls, whatever they returned.
        pub writes: usize,
    }

    impl MemTransport {
        /// An empty transport that reads in chunks of `read_chunk` and never fills up.
        pub fn new(read_chunk: usize) -> MemTransport {
            MemTransport {
                incoming: VecDeque::new(),
                read_chunk,
                eof: false,
                write_capacity: usize::MAX,
                written: Vec::new(),
                reads: 0,
                writes: 0,
            }
        }

        /// Queue `bytes` for reading, as if the other end sent them.
        pub fn send(&mut self, bytes: &[u8]) {
            self.incoming.extend(bytes);
        }

        /// Bytes queued and not read yet.
        pub fn unread(&self) -> usize {
            self.incoming.len()
        }

        /// Take what was written, as if the other end read it.
        pub fn take_written(&mut self) -> Vec<u8> {
            std::mem::take(&mut self.written)
        }
    }

    impl Read for MemTransport {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.reads += 1;
            if self.incoming.is_empty() {
                return if self.eof {
                    Ok(0)
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                };
            }
            let n = buf.len().min(self.read_chunk).min(self.incoming.len());
            for (slot, byte) in buf.iter_mut().zip(self.incoming.drain(..n)) {
                *slot = byte;
            }
            Ok(n)
        }
    }

    impl Write for MemTransport {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.writes += 1;
            if self.write_capacity == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.write_capacity);
            self.write_capacity -= n;
            self.written.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}
