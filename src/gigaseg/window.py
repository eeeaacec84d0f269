"""A rectangular window in pixel coordinates of an image (or of any 2-D grid)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Window:
    """Half-open pixel rectangle: rows ``top .. top+height``, columns ``left .. left+width``."""

    top: int
    left: int
    height: int
    width: int

    def __post_init__(self) -> None:
        if self.height < 0 or self.width < 0:
            raise ValueError(f"window size must be non-negative, got {self.height}x{self.width}")

    @classmethod
    def from_bounds(cls, top: int, left: int, bottom: int, right: int) -> "Window":
        return cls(top, left, bottom - top, right - left)

    @property
    def bottom(self) -> int:
        return self.top + self.height

    @property
    def right(self) -> int:
        return self.left + self.width

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def area(self) -> int:
        return self.height * self.width

    @property
    def slices(self) -> tuple[slice, slice]:
        """Numpy index for this window in an array whose origin is the image origin."""
        return (slice(self.top, self.bottom), slice(self.left, self.right))

    def intersection(self, other: "Window") -> "Window | None":
        top, left = max(self.top, other.top), max(self.left, other.left)
        bottom, right = min(self.bottom, other.bottom), min(self.right, other.right)
        if bottom <= top or right <= left:
            return None
        return Window.from_bounds(top, left, bottom, right)

    def clip(self, height: int, width: int) -> "Window":
        """This window clipped to an image of ``height x width`` (may become empty)."""
        top, left = min(max(self.top, 0), height), min(max(self.left, 0), width)
        bottom, right = min(max(self.bottom, top), height), min(max(self.right, left), width)
        return Window.from_bounds(top, left, bottom, right)

    def relative_to(self, outer: "Window") -> "Window":
        """This window in the coordinates of ``outer`` (whose top-left becomes the origin)."""
        return Window(self.top - outer.top, self.left - outer.left, self.height, self.width)

    def contains(self, other: "Window") -> bool:
        return (
            self.top <= other.top
            and self.left <= other.left
            and other.bottom <= self.bottom
            and other.right <= self.right
        )
