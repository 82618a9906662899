"""HMT (lcattn.memory): shapes, the FIFO cache, the paper's equations, BPTT, a memory task."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lcattn.memory import HMT, HMTConfig, MemoryState, generate
from lcattn.model import DecoderLM, count_params

V, D, L = 32, 16, 8


def backbone(seed=0, d_model=D, layers=1):
    # the dense reference backend: these short segments compile faster than with "xla"
    return DecoderLM(vocab_size=V, d_model=d_model, num_heads=2, num_kv_heads=1,
                     head_dim=d_model // 2, mlp_dim=2 * d_model,
                     layer_pattern=("attn",) * layers, backend="reference",
                     rngs=nnx.Rngs(seed))


def make(seed=0, d_model=D, layers=1, **cfg):
    cfg = {"segment_len": L, "sensory_len": 2, "num_memories": 3, **cfg}
    return HMT(backbone(seed, d_model, layers), HMTConfig(**cfg), rngs=nnx.Rngs(seed + 100))


def tokens(b, t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, t)), jnp.int32)


@nnx.jit
def run(model, x, state=None):
    return model.process(x, state)


def _softmax(z):
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def test_shapes_params_and_ragged_last_segment():
    model = make(memory_dim=4)
    logits, state = run(model, tokens(2, 3 * L + 5))
    assert logits.shape == (2, 3 * L + 5, V) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    assert state.memories.shape == (2, 3, D) and state.sensory.shape == (2, 2, D)
    assert np.asarray(state.valid).all() and state.started
    # initial memory + summary prompt [D] each, W_q and W_k [D, d_h = 4]
    assert count_params(model) == count_params(model.backbone) + 2 * D + 2 * D * 4
    short, _ = run(model, tokens(2, 5))  # a single, short segment
    assert short.shape == (2, 5, V)


def test_fifo_cache_holds_only_produced_memories_and_chaining_equals_one_call():
    """The cache starts empty (M_0 is P_1, never a recall candidate: the official code), fills
    with m_1, m_2, ... and evicts the oldest; chained calls equal one call."""
    model = make(num_memories=3)
    x = tokens(2, 5 * L, seed=1)
    state = model.init_state(2)
    np.testing.assert_array_equal(state.valid, [[False] * 3] * 2)
    history, chained = [], []   # m_1, m_2, ...
    for n in range(5):
        logits, new = run(model, x[:, n * L:(n + 1) * L], state)
        history.append(np.asarray(new.memories[:, -1]))
        filled = min(n + 1, 3)   # the cache holds the last 3 of m_1, ..., m_{n+1}
        np.testing.assert_allclose(np.asarray(new.memories)[:, 3 - filled:],
                                   np.stack(history[-filled:], axis=1), atol=1e-6)
        np.testing.assert_array_equal(new.valid, [[False] * (3 - filled) + [True] * filled] * 2)
        chained.append(np.asarray(logits))
        state = new
    assert not np.allclose(history[0], history[1], atol=1e-3)   # distinct embeddings
    logits, final = run(model, x)
    np.testing.assert_allclose(logits, np.concatenate(chained, axis=1), atol=2e-5)
    np.testing.assert_allclose(final.memories, state.memories, atol=2e-5)
    np.testing.assert_allclose(final.sensory, state.sensory, atol=1e-6)


def test_recall_matches_the_formula_over_filled_slots():
    model = make(num_memories=4, memory_dim=6)
    rng = np.random.default_rng(2)
    mem = rng.normal(size=(3, 4, D)).astype(np.float32)
    valid = np.array([[True] * 4, [False, True, False, True], [False, False, False, True]])
    summary = rng.normal(size=(3, D)).astype(np.float32)
    state = MemoryState(jnp.asarray(mem), jnp.asarray(valid), jnp.zeros((3, 0, D)), True)
    got = np.asarray(model.recall(jnp.asarray(summary), state))
    wq, wk = np.asarray(model.w_q[...], np.float64), np.asarray(model.w_k[...], np.float64)
    for b in range(3):
        m = mem[b][valid[b]].astype(np.float64)
        weights = _softmax((summary[b] @ wq) @ (m @ wk).T / np.sqrt(6))
        np.testing.assert_allclose(got[b], weights @ m, atol=1e-5)
    np.testing.assert_allclose(got[2], mem[2, 3], atol=1e-6)   # one filled slot: itself


def test_segments_follow_the_paper_equations():
    """Segments 1 and 2 rebuilt from the backbone's embeddings-level API."""
    model = make(sensory_len=2, num_memories=3, summary_len=3)
    bb, x = model.backbone, tokens(1, 2 * L, seed=3)
    logits, _ = run(model, x)
    emb = bb.embed(x)
    m0 = model.initial_memory[...][None, None]
    h1 = bb.forward_embeddings(jnp.concatenate([m0, emb[:, :L], m0], axis=1))  # P_1 = M_0
    np.testing.assert_allclose(logits[:, :L], bb.logits(h1[:, 1:L + 1]), atol=2e-5)
    m1 = np.asarray(bb.final_norm(h1[:, -1]))[0]
    t = model.summary_prompt[...][None, None]
    s2 = np.asarray(bb.final_norm(bb.forward_embeddings(
        jnp.concatenate([t, emb[:, L:L + 3], t], axis=1))[:, -1]))[0]
    cache = m1[None].astype(np.float64)           # only m_1: M_0 is no recall candidate
    wq, wk = np.asarray(model.w_q[...], np.float64), np.asarray(model.w_k[...], np.float64)
    p2 = _softmax((s2 @ wq) @ (cache @ wk).T / np.sqrt(D)) @ cache
    np.testing.assert_allclose(p2, m1, atol=1e-6)   # = m_1 exactly, whatever S_2 is
    p2 = jnp.asarray(p2, jnp.float32)[None, None]
    h2 = bb.forward_embeddings(jnp.concatenate([p2, emb[:, L - 2:L], emb[:, L:], p2], axis=1))
    np.testing.assert_allclose(logits[:, L:], bb.logits(h2[:, 3:L + 3]), atol=2e-5)


def test_without_memory_equals_the_backbone_on_each_segment():
    model = make(sensory_len=0, num_memories=0, recall=False)
    assert count_params(model) == count_params(model.backbone)
    x = tokens(2, 3 * L + 3, seed=4)
    logits, _ = run(model, x)
    want = [model.backbone(x[:, s:s + L]) for s in range(0, x.shape[1], L)]
    np.testing.assert_allclose(logits, np.concatenate(want, axis=1), atol=2e-5)


def test_what_each_memory_level_reaches():
    x = tokens(1, 3 * L, seed=5)

    def changed(model, pos):
        y = x.at[0, pos].set((x[0, pos] + 1) % V)
        diff = np.abs(np.asarray(run(model, y)[0] - run(model, x)[0])).max(-1)[0]
        return diff > 1e-5

    sensory = make(sensory_len=3, num_memories=0, recall=False)
    hit = changed(sensory, L - 3)          # the first of segment 1's last 3 tokens
    assert not hit[:L - 3].any() and hit[L - 3:2 * L].all() and not hit[2 * L:].any()
    assert not changed(sensory, L - 4)[L:].any()   # older than the sensory memory
    memory = make(sensory_len=3, num_memories=3)
    assert changed(memory, 0)[2 * L:].all()        # two segments later, through memory
    # The paper's summary reads H_n[0:j]: from segment 3 on (two or more recall candidates) the
    # first j - 1 logits see later tokens (documented); in segment 2 the one candidate m_1
    # takes all the weight. summary_len = 0 makes the recurrence strictly causal.
    assert not changed(memory, L + 3)[L:L + 3].any()
    assert changed(memory, 2 * L + 3)[2 * L:2 * L + 3].any()
    for pos in (L + 3, 2 * L + 1):
        assert not changed(make(sensory_len=3, num_memories=3, summary_len=0), pos)[:pos].any()


def _grads(model, x, wrt):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        m = nnx.merge(graphdef, p)
        logits = m(x[:, :-1])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:])
        mask = m.loss_mask(jnp.ones(nll.shape))
        return jnp.sum(nll * mask) / jnp.sum(mask)

    return np.asarray(jax.jit(jax.grad(loss))(params)[wrt][...])


def test_bptt_reaches_the_first_segment():
    x = tokens(2, 4 * L + 1, seed=6)   # four segments; loss on the last only
    # N = 1: M_0 is only P_1 (never cached), so only BPTT from segment 3 reaches it.
    one = dict(sensory_len=0, num_memories=1, loss_segments="last")
    assert np.abs(_grads(make(**one), x, "initial_memory")).max() > 1e-6   # bptt: all 3
    np.testing.assert_array_equal(_grads(make(**one, bptt_segments=2), x, "initial_memory"), 0)
    # The summary prompt: segment 3 (the first whose recall has two candidates: m_1, m_2)
    # adds to its gradient through BPTT from segment 4.
    full = dict(sensory_len=2, num_memories=3, loss_segments="last")
    g1, g2 = (_grads(make(**full, bptt_segments=k), x, "summary_prompt") for k in (1, 2))
    assert np.abs(g1).max() > 1e-6 and np.abs(g2 - g1).max() > 1e-6


def test_loss_mask_selects_segments():
    mask = jnp.ones((2, 3 * L + 2))
    np.testing.assert_array_equal(make(loss_segments="all").loss_mask(mask), mask)
    # positions 3L-1 .. 3L predict the last segment's tokens 3L, 3L+1 (the official
    # logits[-(B+1):-1] vs labels[-B:]); the final position's target lies past the row
    last = np.asarray(make(loss_segments="last").loss_mask(mask))
    want = np.zeros(3 * L + 2)
    want[3 * L - 1:3 * L + 1] = 1
    np.testing.assert_array_equal(last, np.broadcast_to(want, last.shape))


def test_generate_is_greedy_on_the_known_prefix():
    model = make(seed=7)
    prompt = tokens(2, L + 6, seed=7)
    new = generate(model, prompt, 4)   # the last one is predicted in a third segment
    assert new.shape == (2, 4) and new.dtype == jnp.int32
    seq = jnp.concatenate([prompt, new], axis=1)
    for i in range(4):
        want = jnp.argmax(run(model, seq[:, :L + 6 + i])[0][:, -1], axis=-1)
        np.testing.assert_array_equal(new[:, i], want)
    assert generate(model, prompt, 0).shape == (2, 0)


@pytest.mark.parametrize("cfg, match", [
    (dict(segment_len=0), r"`segment_len` must be an integer >= 1, got 0"),
    (dict(sensory_len=8), r"`sensory_len` must be in \[0, segment_len=8\), got 8"),
    (dict(sensory_len=-1), r"`sensory_len` must be an integer >= 0"),
    (dict(summary_len=9), r"`summary_len` must be an integer in \[0, 8\], got 9"),
    (dict(num_memories=-1), r"`num_memories` must be an integer >= 0, got -1"),
    (dict(num_memories=0), r"`recall=True` needs `num_memories` >= 1"),
    (dict(bptt_segments=0), r"`bptt_segments` must be None or an integer >= 1"),
    (dict(memory_dim=0), r"`memory_dim` must be None or an integer >= 1"),
    (dict(loss_segments="first"), r"`loss_segments` must be one of \('all', 'last'\)"),
    (dict(recall=1), r"`recall` must be True or False"),
])
def test_bad_configs_name_the_parameter(cfg, match):
    with pytest.raises(ValueError, match=match):
        HMTConfig(**{"segment_len": 8, "sensory_len": 2, "num_memories": 3, **cfg})


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="`backbone` must be a DecoderLM"):
        HMT(object(), HMTConfig(segment_len=8, sensory_len=0, num_memories=1),
            rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="at least one token"):
        make().process(jnp.zeros((1, 0), jnp.int32))
    with pytest.raises(ValueError, match="num_new_tokens"):
        generate(make(), tokens(1, 3), -1)


def _key_task(rng, batch, segments=3, key_tokens=2, keys=8):
    """Segment 1 starts with a key (``key_tokens`` copies of one of ``keys`` symbols), the rest
    is noise; the last token of the last segment is the query marker, its target the key."""
    x = rng.integers(16, V, (batch, segments * L)).astype(np.int32)
    key = rng.integers(1, 1 + keys, batch).astype(np.int32)
    x[:, :key_tokens] = key[:, None]
    x[:, -1] = 9
    return x, key


def _train_key_task(cfg, steps=300, seed=0):
    model = make(seed, d_model=32, layers=2, sensory_len=2, **cfg)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(
                nnx.merge(graphdef, p)(x)[:, -1], y).mean()

        grads = jax.grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        params, opt = step(params, opt, *_key_task(rng, 32))
    x, y = _key_task(np.random.default_rng(1234), 512)
    return float(np.mean(np.argmax(nnx.merge(graphdef, params)(x)[:, -1], -1) == y))


@pytest.mark.slow
def test_key_two_segments_before_its_query_is_learned():
    """The key is in segment 1, the query at the end of segment 3: only the memory carries it
    (the 2-token sensory memory holds noise). Chance is 1/8; without memory the same training
    stays at chance, with HMT it is learned (about 20 s on 2 CPU cores)."""
    assert _train_key_task(dict(num_memories=0, recall=False)) < 0.25
    assert _train_key_task(dict(num_memories=4)) > 0.6
