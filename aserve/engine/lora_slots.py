"""Which LoRA adapters the running sequences use, and which of the model's slots hold them.

Sequences hold the loaded adapter object itself, not its name: an adapter unloaded at run time
(server/lora.py) leaves the served list at once, and its running and waiting requests finish
on it. Slots are keyed by the adapter's serial (one per load), so the same load read back from
disk after an eviction from memory finds the slot that still holds it.

The model has `max_loras` adapter slots (models/lora.py). A sequence of an adapter is admitted
only when its adapter is in a slot or a slot is free of running sequences; the scheduler then
waits (first come, first served, so no adapter starves). A slot keeps its adapter after its
last sequence leaves, until another adapter needs the slot: the least recently used free slot
goes first.

Filling a slot (copying an adapter into every layer and repacking those layers' matrices) took
about 100 ms on the default model, more than a decode step: done at once, it stalled every
running stream. So the model runner fills a slot a few layers at a time, before each forward
and never while one reads the slots, for at most half the last forward's time
(ModelRunner.load_adapters), and the sequences of a slot still loading wait (admitted, but not scheduled) until it is ready.
"""

from dataclasses import dataclass, field

from aserve.models.lora import LoRAAdapter


@dataclass
class AdapterSlots:
    max_loras: int
    slot_of: dict[int, int] = field(default_factory=dict)  # adapter's serial -> its slot
    users: list[int] = field(default_factory=list)  # running sequences per slot
    last_used: list[int] = field(default_factory=list)
    loading: dict[int, tuple[LoRAAdapter, int]] = field(default_factory=dict)  # slot -> (adapter, next layer)
    clock: int = 0

    def __post_init__(self) -> None:
        self.users = [0] * self.max_loras
        self.last_used = [0] * self.max_loras

    def acquire(self, adapter: LoRAAdapter) -> int | None:
        """A slot holding `adapter` for one more running sequence, or None if none can now."""
        assert adapter.serial > 0, f"LoRA adapter {adapter.name!r} is not served (LoRARegistry.add sets its serial)"
        self.clock += 1
        slot = self.slot_of.get(adapter.serial)
        if slot is None:
            free = [s for s in range(self.max_loras) if self.users[s] == 0]
            if not free:
                return None
            slot = min(free, key=lambda s: self.last_used[s])
            self.slot_of = {a: s for a, s in self.slot_of.items() if s != slot}
            self.slot_of[adapter.serial] = slot
            self.loading[slot] = (adapter, 0)  # replaces a load left unfinished by sequences that went
        self.users[slot] += 1
        self.last_used[slot] = self.clock
        return slot

    def release(self, slot: int) -> None:
        self.users[slot] -= 1

    def ready(self, slot: int) -> bool:
        return slot not in self.loading

    def next_load(self, num_layers: int) -> tuple[int, LoRAAdapter, int] | None:
        """(slot, adapter, layer) to fill next, counted as done; None when every slot is ready."""
        if not self.loading:
            return None
        slot, (adapter, layer) = next(iter(self.loading.items()))
        if layer + 1 >= num_layers:
            del self.loading[slot]
        else:
            self.loading[slot] = (adapter, layer + 1)
        return slot, adapter, layer
