//! A bounds check run before candle reads a PyTorch `data.pkl`. candle's unpickler builds the whole
//! object tree recursively and copies memoised objects on every reference, so a hostile pickle of a
//! few kilobytes can nest deep enough to overflow the stack (an abort, not an error) or grow without
//! bound. This walk follows the same opcodes, keeping per stack entry only its nesting depth and node
//! count, and refuses a pickle past fixed limits. Anything else that is malformed is left for
//! candle to report: the walk only says "too big" or "fine to hand over".

use std::collections::HashMap;
use std::io::{BufRead, Read};

/// Nesting depth of the objects (a real state dict is under 10 deep).
const MAX_DEPTH: u32 = 1000;
/// Objects candle would allocate, memo copies included (a real state dict: ~15 per tensor).
const MAX_NODES: u64 = 4_000_000;
/// Entries on the unpickler's stack at once.
const MAX_STACK: usize = 1_000_000;

#[derive(Debug, Clone, Copy)]
struct Entry {
    depth: u32,
    nodes: u64,
    mark: bool,
}

const LEAF: Entry = Entry {
    depth: 1,
    nodes: 1,
    mark: false,
};

struct Walk {
    stack: Vec<Entry>,
    memo: HashMap<u32, Entry>,
    created: u64,
}

/// Why a pickle is refused.
pub(crate) type Refusal = String;

/// `Ok` when candle may parse the pickle (it may still reject it), `Err` when it exceeds a limit.
pub(crate) fn check(reader: &mut impl BufRead) -> Result<(), Refusal> {
    let mut walk = Walk {
        stack: Vec::new(),
        memo: HashMap::new(),
        created: 0,
    };
    // `None`: malformed in a way candle reports itself (end of data, stack underflow, ...).
    match walk.run(reader) {
        Some(result) => result,
        None => Ok(()),
    }
}

fn skip(reader: &mut impl Read, n: u64) -> Option<()> {
    let copied = std::io::copy(&mut reader.take(n), &mut std::io::sink()).ok()?;
    (copied == n).then_some(())
}

fn read_array<const N: usize>(reader: &mut impl Read) -> Option<[u8; N]> {
    let mut buf = [0u8; N];
    reader.read_exact(&mut buf).ok()?;
    Some(buf)
}

fn skip_line(reader: &mut impl BufRead) -> Option<()> {
    loop {
        let buf = reader.fill_buf().ok()?;
        if buf.is_empty() {
            return None;
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                reader.consume(i + 1);
                return Some(());
            }
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    }
}

impl Walk {
    /// Counts `allocated` new objects against the limits.
    fn allocate(&mut self, allocated: u64) -> Result<(), Refusal> {
        self.created = self.created.saturating_add(allocated);
        if self.created > MAX_NODES {
            return Err(format!("it builds more than {MAX_NODES} objects"));
        }
        Ok(())
    }

    /// Pushes `entry`, of which `allocated` objects are new.
    fn push(&mut self, entry: Entry, allocated: u64) -> Result<(), Refusal> {
        self.allocate(allocated)?;
        if entry.depth > MAX_DEPTH {
            return Err(format!("objects nest deeper than {MAX_DEPTH} levels"));
        }
        if self.stack.len() >= MAX_STACK {
            return Err(format!("its stack grows past {MAX_STACK} entries"));
        }
        self.stack.push(entry);
        Ok(())
    }

    fn leaf(&mut self) -> Result<(), Refusal> {
        self.push(LEAF, 1)
    }

    /// The object made of `parts` (one new node above them).
    fn parent_of(parts: &[Entry]) -> Entry {
        Entry {
            depth: parts.iter().map(|e| e.depth).max().unwrap_or(0) + 1,
            nodes: parts.iter().fold(1u64, |n, e| n.saturating_add(e.nodes)),
            mark: false,
        }
    }

    /// Pops `n` entries and pushes the object made of them.
    fn combine(&mut self, n: usize) -> Option<Result<(), Refusal>> {
        let parts = self.stack.split_off(self.stack.len().checked_sub(n)?);
        Some(self.push(Self::parent_of(&parts), 1))
    }

    /// The entries above the topmost mark, and the mark removed.
    fn pop_to_mark(&mut self) -> Option<Vec<Entry>> {
        let at = self.stack.iter().rposition(|e| e.mark)?;
        let parts = self.stack.split_off(at + 1);
        self.stack.pop();
        Some(parts)
    }

    /// `parts` go into the container on top of the stack (APPEND, SETITEM, BUILD, ...).
    fn extend_last(&mut self, parts: &[Entry]) -> Option<Result<(), Refusal>> {
        let child = Self::parent_of(parts);
        let last = self.stack.last_mut()?;
        last.depth = last.depth.max(child.depth);
        last.nodes = last.nodes.saturating_add(child.nodes);
        if last.depth > MAX_DEPTH {
            return Some(Err(format!("objects nest deeper than {MAX_DEPTH} levels")));
        }
        Some(Ok(()))
    }

    /// candle pushes a copy of the memoised object.
    fn memo_get(&mut self, id: u32) -> Option<Result<(), Refusal>> {
        let entry = *self.memo.get(&id)?;
        Some(self.push(entry, entry.nodes))
    }

    /// candle stores a copy of the top object.
    fn memo_put(&mut self, id: u32) -> Option<Result<(), Refusal>> {
        let last = *self.stack.last()?;
        self.memo.insert(id, last);
        Some(self.allocate(last.nodes))
    }

    fn run(&mut self, r: &mut impl BufRead) -> Option<Result<(), Refusal>> {
        loop {
            let [op] = read_array::<1>(r)?;
            let step = match op {
                0x80 => skip(r, 1).map(|_| Ok(())), // PROTO
                b'c' => {
                    // GLOBAL: module and class names, each up to a newline.
                    skip_line(r)?;
                    skip_line(r)?;
                    Some(self.leaf())
                }
                b'K' => skip(r, 1).map(|_| self.leaf()), // BININT1
                b'M' => skip(r, 2).map(|_| self.leaf()), // BININT2
                b'J' => skip(r, 4).map(|_| self.leaf()), // BININT
                b'G' => skip(r, 8).map(|_| self.leaf()), // BINFLOAT
                0x8a => {
                    // LONG1: candle decodes at most 8 bytes (more overflows its shift).
                    let [n] = read_array::<1>(r)?;
                    if n > 8 {
                        return Some(Err(format!("LONG1 of {n} bytes (at most 8 are read)")));
                    }
                    skip(r, u64::from(n)).map(|_| self.leaf())
                }
                b'X' => {
                    let len = u32::from_le_bytes(read_array::<4>(r)?); // BINUNICODE
                    skip(r, u64::from(len)).map(|_| self.leaf())
                }
                b'N' | 0x88 | 0x89 | b')' | b']' | b'}' => Some(self.leaf()),
                b'(' => Some(self.push(Entry { mark: true, ..LEAF }, 1)),
                b'Q' => self.combine(1),               // BINPERSID
                0x85 => self.combine(1),               // TUPLE1
                0x86 | b'R' | 0x81 => self.combine(2), // TUPLE2, REDUCE, NEWOBJ
                0x87 => self.combine(3),               // TUPLE3
                b't' | b'd' => {
                    // TUPLE, DICT
                    let parts = self.pop_to_mark()?;
                    Some(self.push(Self::parent_of(&parts), 1))
                }
                b'a' | b'b' => {
                    // APPEND, BUILD: one object into the one below it.
                    let top = self.stack.pop()?;
                    self.extend_last(&[top])
                }
                b's' => {
                    // SETITEM
                    let value = self.stack.pop()?;
                    let key = self.stack.pop()?;
                    self.extend_last(&[key, value])
                }
                b'e' | b'u' => {
                    // APPENDS, SETITEMS
                    let parts = self.pop_to_mark()?;
                    self.extend_last(&parts)
                }
                b'h' => {
                    let [id] = read_array::<1>(r)?; // BINGET
                    self.memo_get(u32::from(id))
                }
                b'j' => {
                    let id = u32::from_le_bytes(read_array::<4>(r)?); // LONG_BINGET
                    self.memo_get(id)
                }
                b'q' => {
                    let [id] = read_array::<1>(r)?; // BINPUT
                    self.memo_put(u32::from(id))
                }
                b'r' => {
                    let id = u32::from_le_bytes(read_array::<4>(r)?); // LONG_BINPUT
                    self.memo_put(id)
                }
                b'.' => return Some(Ok(())), // STOP
                _ => return None,            // candle rejects the op code itself
            };
            match step? {
                Ok(()) => {}
                Err(refusal) => return Some(Err(refusal)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_bytes(bytes: &[u8]) -> Result<(), Refusal> {
        check(&mut std::io::Cursor::new(bytes))
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut pickle = b"\x80\x02N".to_vec();
        pickle.extend(std::iter::repeat_n(0x85, 100_000));
        pickle.push(b'.');
        let err = check_bytes(&pickle).unwrap_err();
        assert!(err.contains("deeper than 1000"), "{err}");
        // Shallow nesting is fine.
        assert_eq!(check_bytes(b"\x80\x02N\x85\x85\x85."), Ok(()));
    }

    #[test]
    fn memo_doubling_is_refused() {
        // x = (); repeat: put 0; get 0; get 0; tuple2 -> x doubles each round.
        let mut pickle = b"\x80\x02)".to_vec();
        for _ in 0..64 {
            pickle.extend(b"q\x00h\x00\x86"); // BINPUT 0, BINGET 0, TUPLE2
        }
        pickle.push(b'.');
        let err = check_bytes(&pickle).unwrap_err();
        assert!(err.contains("objects"), "{err}");
    }

    #[test]
    fn long1_wider_than_8_bytes_is_refused() {
        let err = check_bytes(b"\x80\x02\x8a\x09123456789.").unwrap_err();
        assert!(err.contains("LONG1"), "{err}");
        assert_eq!(check_bytes(b"\x80\x02\x8a\x0812345678."), Ok(()));
    }

    #[test]
    fn malformed_input_is_left_to_candle() {
        for bytes in [&b""[..], b"\x80", b"t", b"\xff", b"Xzzzz"] {
            assert_eq!(check_bytes(bytes), Ok(()), "{bytes:?}");
        }
    }
}
