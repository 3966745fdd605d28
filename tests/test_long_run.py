"""One process, many generations: memory stays flat, results stay the same, threads get their own.

`Dia` is thread-safe by design: every request keeps its caches, random generator and decode stream
to itself, and ONNX Runtime's sessions may be run from several threads at once.
"""

from __future__ import annotations

import threading

import numpy as np

from bench.measure import memory_bytes

GENERATIONS = 200
RSS_GROWTH_LIMIT = 40 * 2**20  # bytes of resident memory 200 generations may add after the warm-up
TEXTS = ("[S1] Hi.", "[S1] A longer line, to vary the text width. [S2] And a reply.", "[S2] Yes?")


def one_generation(dia, index: int) -> np.ndarray:
    """Generation `index` of the long run: lengths, batch sizes and streaming take turns."""
    text = TEXTS[index % len(TEXTS)]
    options = dict(seed=index % 7, max_new_tokens=8 + 37 * (index % 5))
    kind = index % 4
    if kind == 0:
        return dia.generate(text, **options)
    if kind == 1:
        return np.concatenate(dia.generate_batch([text] * (1 + index % 3), **options))
    if kind == 2:
        return np.concatenate([np.zeros(0, np.float32), *dia.generate_stream(text, **options)])
    prompt = np.full((3 + index % 9, 9), index % 1024, dtype=np.int64)
    return dia.generate(text, audio_prompt=prompt, **options)


def test_200_generations_keep_memory_flat_and_results_equal(tiny_dia):
    first = one_generation(tiny_dia, 0)
    for index in range(1, 20):  # warm-up: buffers, arenas and caches reach their working size
        one_generation(tiny_dia, index)
    start = memory_bytes("VmRSS")
    peak = start
    for index in range(20, GENERATIONS):
        audio = one_generation(tiny_dia, index)
        assert np.isfinite(audio).all()
        peak = max(peak, memory_bytes("VmRSS"))
    growth = memory_bytes("VmRSS") - start
    print(f"resident memory: {start / 2**20:.1f} MiB after the warm-up, growth {growth / 2**20:+.1f} MiB, "
          f"peak {peak / 2**20:.1f} MiB over {GENERATIONS} generations")  # fmt: skip
    assert growth < RSS_GROWTH_LIMIT
    np.testing.assert_array_equal(one_generation(tiny_dia, 0), first)  # the first again: the same audio


def test_threads_sharing_one_dia_each_get_their_own_result(tiny_dia):
    """8 threads, each with its own text, seed and entry point, all at once: each equals its solo run."""
    jobs = [(index * 5 + 1, index) for index in range(8)]
    solo = {index: one_generation(tiny_dia, run) for run, index in jobs}
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def work(run: int, index: int) -> None:
        try:
            barrier.wait(timeout=30)
            for _ in range(3):
                results[index] = one_generation(tiny_dia, run)
                np.testing.assert_array_equal(results[index], solo[index])
        except BaseException as error:  # reported below, with the thread's own traceback
            errors.append(error)

    threads = [threading.Thread(target=work, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread did not finish in 120 s"
    assert not errors, errors
    assert sorted(results) == [index for _, index in jobs]
