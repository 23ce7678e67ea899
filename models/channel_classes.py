"""Classes of tensor dimensions that must keep the same channels (graph.py's bookkeeping).

A union-find over dimensions. A derived class is laid out as segments of other classes: a
concatenation's output dim holds its inputs' channels one after another; a flatten's output dim
holds each channel of the merged dim as a block of positions. A class can be kept whole, with
the first reason given; an add marks the class it joins (a residual stream).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """All channels of class `base`, each owning `block` consecutive positions."""
    base: int
    block: int = 1


class Classes:
    """Union-find over tensor dimensions, with derived classes and kept-whole reasons."""

    def __init__(self):
        self.parent, self.size = [], []
        self.layout = {}  # root -> tuple of Segments (a derived class)
        self.whole = {}  # root -> first reason its channels stay whole
        self.joined = set()  # roots an add joined (a residual stream)

    def new(self, size):
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        return len(self.parent) - 1

    def find(self, c):
        while self.parent[c] != c:
            self.parent[c] = self.parent[self.parent[c]]
            c = self.parent[c]
        return c

    def segments(self, c, depth=0):
        """The class as segments of plain classes (a plain class is one), composed through
        derived ones; None past a depth no real layout reaches (a cycle)."""
        r = self.find(c)
        if r not in self.layout:
            return (Segment(r),)
        if depth > 32:
            return None
        out = []
        for s in self.layout[r]:
            inner = self.segments(s.base, depth + 1)
            if inner is None:
                return None
            out += [Segment(i.base, i.block * s.block) for i in inner]
        return tuple(out)

    def derived(self, segments):
        """A class laid out as `segments` (the plain class itself when that is all it is)."""
        segs = []
        for s in segments:
            inner = self.segments(s.base)
            if inner is None:
                return self.fresh_whole(sum(self.size[self.find(x.base)] * x.block for x in segments),
                                        "a layout not followed")
            segs += [Segment(i.base, i.block * s.block) for i in inner]
        if len(segs) == 1 and segs[0].block == 1:
            return segs[0].base
        c = self.new(sum(self.size[s.base] * s.block for s in segs))
        self.layout[c] = tuple(segs)
        return c

    def fresh_whole(self, size, reason):
        c = self.new(size)
        self.whole[c] = reason
        return c

    def keep_whole(self, c, reason):
        r = self.find(c)
        if r in self.layout:
            for s in self.segments(r) or ():
                self.keep_whole(s.base, reason)
        self.whole.setdefault(r, reason)

    def unify(self, a, b, join=False):
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            if join:
                self.joined.add(ra)
            return
        if self.size[ra] != self.size[rb]:
            self.keep_whole(ra, "sizes disagree")
            self.keep_whole(rb, "sizes disagree")
            return
        la, lb = ra in self.layout, rb in self.layout
        if la and lb and self.segments(ra) != self.segments(rb):
            self.keep_whole(ra, "two different channel layouts meet")
            self.keep_whole(rb, "two different channel layouts meet")
            return
        if lb and not la:
            ra, rb = rb, ra  # the derived class stays the root: its layout describes both
        if rb in self.whole:
            self.keep_whole(ra, self.whole.pop(rb))
        if rb in self.joined or join:
            self.joined.add(ra)
        self.parent[rb] = ra
