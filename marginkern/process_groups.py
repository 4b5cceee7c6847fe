"""Modules that hold a torch.distributed process group."""
import copy


class SharesProcessGroup:
    """Mixin of a module whose `group` attribute is a torch.distributed process group (or None): copy.deepcopy of it
    (a model's EMA or reference copy) shares the group, a handle to the job's communicator that cannot be copied
    (deepcopy raised "cannot pickle ProcessGroup"); everything else is copied as nn.Module's own deepcopy does."""

    def __deepcopy__(self, memo):
        memo[id(self.group)] = self.group
        copied = self.__class__.__new__(self.__class__)
        memo[id(self)] = copied
        copied.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return copied
