"""A replay ring on the training device that saves and restores itself (the stage that fills it defines its rows)."""

import torch


class RingBuffer:
    """Fixed-capacity tensor storage filled in a ring (`fields`: column name -> shape of one row). `state_dict()` holds
    the filled rows under `name`; `load_state_dict` restores them, also into another capacity (a longer --total-steps
    on resume), keeping the newest rows, oldest first."""

    def __init__(self, name: str, capacity: int, fields: dict, device):
        self.name, self.capacity, self.ptr, self.size = name, capacity, 0, 0
        self.data = {key: torch.zeros(capacity, *shape, device=device) for key, shape in fields.items()}

    def advance(self):
        self.ptr, self.size = (self.ptr + 1) % self.capacity, min(self.size + 1, self.capacity)

    def state_dict(self) -> dict:
        rows = {key: column[: self.size].cpu() for key, column in self.data.items()}
        return {self.name: rows, f"{self.name}_ptr": self.ptr, f"{self.name}_capacity": self.capacity}

    def load_state_dict(self, saved: dict):
        rows, self.ptr = saved[self.name], saved[f"{self.name}_ptr"]
        self.size = len(next(iter(rows.values())))
        if saved[f"{self.name}_capacity"] != self.capacity:  # the rows oldest first, as many of the newest as fit
            rows = {key: column.roll(-self.ptr, 0)[-self.capacity :] for key, column in rows.items()}
            self.size = min(self.size, self.capacity)
            self.ptr = self.size % self.capacity
        for key, column in rows.items():
            self.data[key][: self.size] = column.to(self.data[key].device)
