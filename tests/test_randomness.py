"""Random identifiers read from os.urandom in bulk."""

import os

from twisted.trial import unittest

from mailgw import randomness
from mailgw.randomness import random_hex


class RandomHexTests(unittest.TestCase):
    def test_unique_hex_across_chunks(self):
        values = [random_hex() for _ in range(3 * randomness._CHUNK // 16)]
        self.assertEqual(len(set(values)), len(values))
        self.assertTrue(all(len(v) == 32 and int(v, 16) >= 0 for v in values))
        self.assertEqual(len(random_hex(4)), 8)
        self.assertEqual(len(random_hex(2 * randomness._CHUNK)), 4 * randomness._CHUNK)

    def test_one_system_call_per_chunk(self):
        calls = []
        real = os.urandom
        self.patch(os, "urandom", lambda n: calls.append(n) or real(n))
        source = randomness._RandomBytes()
        for _ in range(randomness._CHUNK // 16 + 1):
            source.take(16)
        self.assertEqual(calls, [randomness._CHUNK, randomness._CHUNK])

    def test_forked_child_does_not_repeat_its_parent(self):
        random_hex()  # bytes in the buffer at the fork
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report its next id and leave at once
            os.write(write, random_hex().encode())
            os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        child = os.read(read, 64).decode()
        os.close(read)
        self.assertEqual(len(child), 32)
        self.assertNotEqual(child, random_hex())
