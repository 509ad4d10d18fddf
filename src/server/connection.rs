//! One client's TCP stream: buffering bytes into frames, answering them in
//! order, and flushing replies with as few system calls as the kernel allows.

use std::io::{self, Read, Write};
use std::net::SocketAddr;

use byteorder::{BigEndian, ByteOrder};
use log::{debug, info};
use mio::net::TcpStream;

use crate::protocol::{Decoded, HEADER_LEN, Request, decode};

use super::handler::Core;

/// Starting (and resting) size of a connection's input buffer.
const INPUT_BUFFER_BYTES: usize = 16 * 1024;
/// Replies pending beyond this stop the connection from reading: a client that
/// does not read its replies cannot grow the server's memory.
const OUTPUT_HIGH_WATER_BYTES: usize = 256 * 1024;
/// An idle output buffer larger than this is given back to the allocator.
const OUTPUT_KEEP_BYTES: usize = 64 * 1024;

/// Whether the connection should stay registered.
#[derive(Debug, PartialEq, Eq)]
pub enum Liveness {
    /// Keep it.
    Open,
    /// Deregister and drop it.
    Closed,
}

/// A client connection and its buffers.
#[derive(Debug)]
pub struct Connection {
    /// The socket, registered with the reactor.
    pub stream: TcpStream,
    peer: SocketAddr,
    input: Vec<u8>,
    /// Unparsed bytes are `input[in_start..in_end]`.
    in_start: usize,
    in_end: usize,
    /// Bytes the next frame needs in `input`, known once its header is in.
    frame_need: usize,
    output: Vec<u8>,
    /// Unsent bytes are `output[out_start..]`.
    out_start: usize,
    /// Set on EOF or a stream-breaking error: flush what is pending, then close.
    closing: bool,
}

impl Connection {
    /// Wrap an accepted stream.
    pub fn new(stream: TcpStream, peer: SocketAddr) -> Connection {
        Connection {
            stream,
            peer,
            input: vec![0; INPUT_BUFFER_BYTES],
            in_start: 0,
            in_end: 0,
            frame_need: HEADER_LEN,
            output: Vec::with_capacity(INPUT_BUFFER_BYTES),
            out_start: 0,
            closing: false,
        }
    }

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// React to readiness (either direction): read, answer every complete frame, write.
    ///
    /// Edge-triggered readiness is only lost if not drained, so this reads
    /// until a short read or `WouldBlock`; a short read already proves the
    /// socket is empty, which saves the extra `read` per request.
    pub fn on_ready(&mut self, core: &mut Core) -> Liveness {
        let mut may_read = true;
        loop {
            if !self.closing {
                self.answer_buffered(core);
            }
            if let Err(e) = self.flush() {
                debug!("{}: write failed: {e}", self.peer);
                return Liveness::Closed;
            }
            if self.closing {
                break;
            }
            if !may_read || self.pending_output() >= OUTPUT_HIGH_WATER_BYTES {
                // Backpressure: the WRITABLE edge brings us back once the client reads.
                break;
            }
            match self.fill() {
                Ok(Filled::Eof) => self.closing = true,
                Ok(Filled::Short) => may_read = false,
                Ok(Filled::Full) => {}
                Ok(Filled::WouldBlock) => may_read = false,
                Err(e) => {
                    debug!("{}: read failed: {e}", self.peer);
                    return Liveness::Closed;
                }
            }
        }
        if self.closing && self.pending_output() == 0 {
            Liveness::Closed
        } else {
            Liveness::Open
        }
    }

    fn pending_output(&self) -> usize {
        self.output.len() - self.out_start
    }

    /// Answer complete frames in order until the input runs out or replies back up.
    fn answer_buffered(&mut self, core: &mut Core) {
        while self.pending_output() < OUTPUT_HIGH_WATER_BYTES {
            let buffered = &self.input[self.in_start..self.in_end];
            match decode(buffered, core.max_value_bytes) {
                Ok(Decoded::Frame(frame, used)) => {
                    let id = frame.header.request_id;
                    match Request::from_frame(&frame) {
                        Ok(request) => core.execute(request, id, &mut self.output),
                        Err(e) => {
                            debug!("{}: rejected request {id}: {e}", self.peer);
                            core.reject(frame.header.opcode, id, &e, &mut self.output);
                        }
                    }
                    self.in_start += used;
                }
                Ok(Decoded::Incomplete(need)) => {
                    self.frame_need = need.unwrap_or(HEADER_LEN);
                    return;
                }
                Err(e) => {
                    // The stream cannot be split into frames any more: say why, then close.
                    info!("{}: closing connection: {e}", self.peer);
                    let id = BigEndian::read_u32(&buffered[4..8]);
                    core.reject(buffered[2], id, &e, &mut self.output);
                    self.closing = true;
                    return;
                }
            }
        }
    }

    /// One `read` into the free end of the input buffer, making room first.
    fn fill(&mut self) -> io::Result<Filled> {
        if self.in_start == self.in_end {
            self.in_start = 0;
            self.in_end = 0;
            if self.input.len() > INPUT_BUFFER_BYTES && self.frame_need <= INPUT_BUFFER_BYTES {
                self.input.truncate(INPUT_BUFFER_BYTES);
                self.input.shrink_to_fit();
            }
        }
        // frame_need was validated against the limits by the header parser, so
        // growing to it is bounded.
        let room_needed = self.frame_need.max(HEADER_LEN);
        if self.input.len() - self.in_start < room_needed || self.in_end == self.input.len() {
            self.input.copy_within(self.in_start..self.in_end, 0);
            self.in_end -= self.in_start;
            self.in_start = 0;
            if self.input.len() < room_needed {
                self.input.resize(room_needed, 0);
            }
        }
        let space = self.input.len() - self.in_end;
        // Only an incomplete frame is left buffered, and the buffer holds a whole frame.
        debug_assert!(space > 0);
        loop {
            return match self.stream.read(&mut self.input[self.in_end..]) {
                Ok(0) => Ok(Filled::Eof),
                Ok(n) => {
                    self.in_end += n;
                    Ok(if n < space { Filled::Short } else { Filled::Full })
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Filled::WouldBlock),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
        }
    }

    /// Write pending replies until done or the socket is full.
    fn flush(&mut self) -> io::Result<()> {
        while self.out_start < self.output.len() {
            match self.stream.write(&self.output[self.out_start..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_start += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
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

/// What one `read` did.
enum Filled {
    /// The peer closed its side.
    Eof,
    /// Fewer bytes than asked: the socket is drained.
    Short,
    /// The buffer filled up: there may be more.
    Full,
    /// Nothing to read.
    WouldBlock,
}
