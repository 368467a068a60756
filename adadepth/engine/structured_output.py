"""Structured outputs with xgrammar (vLLM's default backend): JSON schema, any JSON object,
regex, a choice of strings, or an EBNF grammar.

A constraint is compiled once per distinct constraint (cached; compiling a schema takes
milliseconds to seconds, so the server compiles off its event loop before admitting a request)
into a token-level automaton. Each constrained sequence carries a `GrammarMatcher`; before every
sampling step the matchers write which tokens may come next into a packed bitmask, (B, V/32)
int32, and the logits of every other token become -inf. After a token is sampled its matcher
advances; a matcher that reaches the end of its grammar allows only the end-of-sequence tokens.
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict

import torch

from adadepth.engine.sequence import Sequence
from adadepth.sampling_params import StructuredOutputsParams


# xgrammar (0.2.x) writes the characters of a length-bounded JSON string (maxLength, minLength) as
# [^"\\\r\n], which admits the control characters U+0000-U+001F that JSON forbids unescaped (its
# unbounded strings exclude them). The same class without them, as xgrammar prints its EBNF:
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\\r\n]'


# Whitespace between JSON tokens, at most this many characters per gap. With more, a small or
# shallow model fills its token budget with newlines and the JSON never closes
# (benchmarks/results/structured_outputs_whitespace24.json); two keep it readable and bounded.
MAX_JSON_WHITESPACE = 2


def json_strings_without_control_chars(ebnf: str) -> str:
    return ebnf.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR)


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int], cache_size: int = 256):
        try:
            import xgrammar
        except ImportError as exc:  # the project installs it; a hand-made environment may lack it
            raise RuntimeError("structured outputs need the xgrammar package (pip install --no-deps xgrammar "
                               "apache-tvm-ffi)") from exc
        self._xgr = xgrammar
        self.vocab_size = vocab_size
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=sorted(eos_token_ids))
        self._compiler = xgrammar.GrammarCompiler(info)
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._cache_size = cache_size
        # The server compiles on worker threads while the engine thread reads the cache.
        self._lock = threading.Lock()
        self._bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)
        # The C++ kernel when the CPU kernels are loaded (kernels/token_bitmask_cpu.cpp), else the
        # PyTorch reference; both take float32 CPU logits.
        from adadepth.kernels.token_bitmask import token_bitmask_op

        self._apply = token_bitmask_op()

    def compile(self, params: StructuredOutputsParams):
        """The compiled grammar of a constraint; ValueError (a client's mistake) when it is invalid."""
        key = params.key
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            compiled = self._compile(params)
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar reports bad input this way
            # Its messages open with "[time] /path/file.cc:line: "; the client needs only the rest.
            reason = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(exc).strip())
            raise ValueError(f"invalid {key[0].replace('_', ' ')} for structured outputs: {reason}") from None
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, params: StructuredOutputsParams):
        c = self._compiler
        any_whitespace = not params.disable_any_whitespace
        if params.json is not None or params.json_object:
            schema = params.json if params.json is not None else '{"type": "object"}'
            grammar = self._xgr.Grammar.from_json_schema(schema, any_whitespace=any_whitespace,
                                                         max_whitespace_cnt=MAX_JSON_WHITESPACE if any_whitespace else None)
            return c.compile_grammar(self._xgr.Grammar.from_ebnf(json_strings_without_control_chars(str(grammar))))
        if params.regex is not None:
            return c.compile_regex(params.regex)
        if params.choice is not None:
            # An EBNF alternation of JSON-quoted literals: any string, quotes and backslashes included.
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(choice) for choice in params.choice))
        return c.compile_grammar(params.grammar)

    def matcher(self, params: StructuredOutputsParams):
        return self._xgr.GrammarMatcher(self.compile(params))

    def apply_bitmask(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """-inf (in place) to the logits of every token the rows' grammars do not allow next."""
        rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if self._bitmask.shape[0] < len(seqs):
            self._bitmask = self._xgr.allocate_token_bitmask(len(seqs), self.vocab_size)
        bitmask = self._bitmask[: len(seqs)]                                      # (B, ceil(V / 32))
        for i in rows:
            seqs[i].grammar.fill_next_token_bitmask(bitmask, i)
        if logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.is_contiguous():
            self._apply(logits, bitmask, torch.tensor(rows, dtype=torch.long))
        else:  # GPU logits: xgrammar's own kernels
            self._xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=self.vocab_size,
                                                  indices=rows)
