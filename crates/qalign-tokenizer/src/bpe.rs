//! SentencePiece's BPE merge loop, in O(n log n).
//!
//! The text is split into characters (user-defined pieces are kept whole and frozen). Then the
//! adjacent pair whose concatenation is a vocabulary piece with the highest score is merged,
//! ties going to the leftmost pair, until no pair is in the vocabulary. Candidates live in a
//! max-heap over a doubly linked list of symbols; entries made stale by an earlier merge are
//! recognised by their length and skipped, exactly as sentencepiece's `bpe_model.cc` does, so
//! the merge order (and thus the output) is identical.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::ops::Range;

use rustc_hash::FxHashMap;

use crate::tokenizer::{PieceKind, Tokenizer};

const NONE: usize = usize::MAX;

/// A run of the normalised text that is currently one symbol.
#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    end: usize,
    prev: usize,
    next: usize,
    frozen: bool,
}

impl Symbol {
    fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// A possible merge of `left` with its right neighbour `right`.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl Ord for Candidate {
    /// Higher score first; on equal scores the smaller `left` index (leftmost pair) first.
    /// Scores are finite or infinite, never NaN, and -0.0 was normalised at load time.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

impl Tokenizer {
    /// Splits normalised text into final BPE pieces, returned as byte ranges of `normalized`.
    /// A range may name a piece outside the vocabulary (a character without a piece); the caller
    /// applies byte fallback.
    pub(crate) fn bpe_segments(&self, normalized: &str) -> Vec<Range<usize>> {
        let mut symbols = self.initial_symbols(normalized);
        if symbols.is_empty() {
            return Vec::new();
        }
        let mut heap = BinaryHeap::with_capacity(symbols.len());
        // Merged piece text → length of its left part, for merges into UNUSED pieces that must be
        // split again at the end (sentencepiece's `rev_merge`).
        let mut unused_splits: FxHashMap<&str, usize> = FxHashMap::default();

        let mut push_candidate =
            |symbols: &[Symbol], left: usize, right: usize, heap: &mut BinaryHeap<Candidate>| {
                if left == NONE || right == NONE {
                    return;
                }
                let (l, r) = (symbols[left], symbols[right]);
                if l.frozen || r.frozen {
                    return;
                }
                let merged = &normalized[l.start..r.end];
                let Some(&id) = self.mergeable.get(merged) else {
                    return;
                };
                let piece = &self.pieces[id as usize];
                heap.push(Candidate {
                    score: piece.score,
                    left,
                    right,
                    len: merged.len(),
                });
                if piece.kind == PieceKind::Unused {
                    unused_splits.insert(merged, l.end - l.start);
                }
            };

        for i in 1..symbols.len() {
            push_candidate(&symbols, i - 1, i, &mut heap);
        }

        while let Some(top) = heap.pop() {
            let (l, r) = (symbols[top.left], symbols[top.right]);
            // Stale: one side was merged away, or grew since this candidate was made.
            if l.is_empty() || r.is_empty() || (l.end - l.start) + (r.end - r.start) != top.len {
                continue;
            }
            symbols[top.left].end = r.end;
            symbols[top.left].next = r.next;
            if r.next != NONE {
                symbols[r.next].prev = top.left;
            }
            symbols[top.right].start = r.end;
            symbols[top.right].end = r.end;
            let prev = symbols[top.left].prev;
            let next = symbols[top.left].next;
            push_candidate(&symbols, prev, top.left, &mut heap);
            push_candidate(&symbols, top.left, next, &mut heap);
        }

        let mut out = Vec::with_capacity(symbols.len());
        let mut index = 0;
        while index != NONE {
            let s = symbols[index];
            self.resegment(normalized, s.start..s.end, &unused_splits, &mut out);
            index = s.next;
        }
        out
    }

    /// Splits the text into single characters, except that user-defined pieces (longest match)
    /// become one frozen symbol each.
    fn initial_symbols(&self, normalized: &str) -> Vec<Symbol> {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(normalized.len());
        let mut skip_until = 0;
        for (pos, c) in normalized.char_indices() {
            if pos < skip_until {
                continue;
            }
            let tail = &normalized[pos..];
            let (len, frozen) = match self
                .user_defined
                .iter()
                .find(|piece| tail.starts_with(&***piece))
            {
                Some(piece) => (piece.len(), true),
                None => (c.len_utf8(), false),
            };
            skip_until = pos + len;
            let index = symbols.len();
            symbols.push(Symbol {
                start: pos,
                end: pos + len,
                prev: if index == 0 { NONE } else { index - 1 },
                next: index + 1,
                frozen,
            });
        }
        if let Some(last) = symbols.last_mut() {
            last.next = NONE;
        }
        symbols
    }

    /// Emits a final symbol, splitting merges into UNUSED pieces back into their halves. An
    /// explicit stack instead of recursion: a hostile model can nest such merges very deeply.
    fn resegment(
        &self,
        normalized: &str,
        range: Range<usize>,
        unused_splits: &FxHashMap<&str, usize>,
        out: &mut Vec<Range<usize>>,
    ) {
        let mut pending = vec![range];
        while let Some(range) = pending.pop() {
            let piece = &normalized[range.clone()];
            let is_unused = self.has_unused
                && self
                    .token_to_id(piece)
                    .is_some_and(|id| self.piece_kind(id) == Some(PieceKind::Unused));
            match unused_splits.get(piece) {
                // The split point came from a merge of the same text, so it is a char boundary.
                Some(&left_len)
                    if is_unused
                        && left_len > 0
                        && left_len < range.len()
                        && piece.is_char_boundary(left_len) =>
                {
                    let mid = range.start + left_len;
                    // Right half below the left one: the left half is emitted first.
                    pending.push(mid..range.end);
                    pending.push(range.start..mid);
                }
                _ => out.push(range),
            }
        }
    }
}
