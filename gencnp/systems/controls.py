"""GenCNP's input-dependence controls as target passes: the control inputs of a batch (swap partners, null inputs and
their chance logits), their first-tap outputs, and the masked passes of a pathway's controls as one stack
(docs/design.md sections 2 and 8, and the report's pass budget in section 9)."""

from __future__ import annotations

import torch

__all__ = ["ControlPasses"]


class ControlPasses:
    """Mixin of ``GenCNP`` (a module with ``target``, ``generator``, ``null_eval``, ``partner_images``,
    ``null_inputs`` and ``fills``)."""

    def control_inputs(self, x: torch.Tensor, y_hat: torch.Tensor, chance: bool = True, nulls: bool = True) -> dict:
        """The inputs every pathway of ``x`` is checked on (``controls``): the swap probes, the null families of
        ``null_eval`` and the unmasked target's logits on those (chance; ``chance=False`` leaves them to the caller).
        They depend on ``x`` and ``y_hat`` only, so callers that check several pathways of one batch compute them
        once and pass them to ``controls``. ``nulls=False``: no null inputs (``controls`` then runs swap and zero
        only, for callers that do not read null forcing)."""
        partners, valid = self.partner_images(x, y_hat)
        nulls = [self.null_inputs(f, x) for f in self.null_eval] if nulls else []
        logits = torch.split(self.target(torch.cat(nulls)), x.shape[0]) if nulls and chance else []
        return {"partners": partners, "valid": valid, "nulls": nulls, "chance": list(logits)}

    def controls(
        self,
        x: torch.Tensor,
        ex: dict,
        necessity: bool = False,
        inputs: dict | None = None,
        firsts: torch.Tensor | None = None,
    ) -> dict:
        """Input-dependence controls for pathways ``ex['pathway']``: probe swap, zero image, the null families of
        ``null_eval`` (with the unmasked target's logits on them: the chance level), (complement).

        ``inputs``: ``control_inputs(x, ex['y_hat'])`` when already computed for this batch; ``firsts``:
        ``control_firsts(x, inputs)`` (the passes then start at the first tap)."""
        if inputs is None:
            inputs = self.control_inputs(x, ex["y_hat"])
        xs, ms = self.control_stack(x, ex["pathway"], inputs, necessity)
        first = None
        if firsts is not None:  # stacked as [x, partners, zero, nulls...]; the control stack is x last
            b = x.shape[0]
            first = torch.cat([firsts[b:], firsts[:b]]) if necessity else firsts[b:]
        with torch.no_grad():
            logits = self.target(
                torch.cat(xs), masks=self.generator.split(torch.cat(ms)), fill=self.fills(), first_tap=first
            )
        return self.control_outputs(logits, x.shape[0], inputs, necessity)

    @torch.no_grad()
    def control_firsts(self, x: torch.Tensor, inputs: dict) -> torch.Tensor | None:
        """The first tap's unmasked output for ``x``, the swap partners, the zero image and the null inputs of
        ``inputs``, stacked in that order (``controls(..., firsts=...)`` then starts its passes at the first tap);
        ``None`` where the target cannot start there. The model runs only as far as the first tap."""
        if not self.target.hooks.can_skip_first:
            return None
        zero = self.target.first_tap_output(torch.zeros_like(x[:1]))  # the same for every image
        parts = [x, inputs["partners"], *inputs["nulls"]]
        out = [self.target.first_tap_output(p) for p in parts]
        return torch.cat([out[0], out[1], zero.expand(x.shape[0], *zero.shape[1:]), *out[2:]])

    def control_stack(
        self, x: torch.Tensor, pathway: torch.Tensor, inputs: dict, necessity: bool = False
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The inputs and masks of the controls' masked passes, in the order ``control_outputs`` reads them: the
        swap partners, the zero image and the null inputs through ``pathway``, and (``necessity``) ``x`` through
        its complement."""
        masks = pathway.float()
        nulls = inputs["nulls"]
        xs, ms = [inputs["partners"], torch.zeros_like(x), *nulls], [masks] * (2 + len(nulls))
        if necessity:
            xs.append(x)
            ms.append(1.0 - masks)
        return xs, ms

    def control_outputs(self, logits: torch.Tensor, b: int, inputs: dict, necessity: bool = False) -> dict:
        """``controls``' dict from the logits of ``control_stack``'s passes (``b`` images each)."""
        chunks = torch.split(logits, b)
        nulls = inputs["nulls"]
        out = {"swap_logits": chunks[0], "zero_logits": chunks[1], "swap_valid": inputs["valid"]}
        if nulls:
            out["null_logits"] = dict(zip(self.null_eval, chunks[2 : 2 + len(nulls)]))
            out["null_chance_logits"] = dict(zip(self.null_eval, inputs["chance"]))
        if necessity:
            out["necessity_logits"] = chunks[-1]
        return out
