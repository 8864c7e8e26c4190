"""Answers a robot can trust (issue #18), as a mixin of GroundingPipeline's instruction mode:

- presence (presence.py): each phrase gets a calibrated probability that it names something in view; below
  `presence_threshold` its object is `found=False` with an empty mask, and the result lists it in `not_found`;
- instances (instances.py): with `instances: auto`, a plural phrase ("all the mugs") gives one object per instance
  (kept by the instance filter, which may ask the LMM about each: kind_check.py); one that names no kind or colour
  ("all the objects") gives the objects the LMM's own description names;
- relations (relations.py): with `instances: auto` and a bundle's relation calibration, "the ball next to the bowl"
  is checked on the instances of both objects: its presence is also P(the relation holds), its object the ball
  nearest the bowl;
- the answer (answers.py): with `answer_source: grounded`, what it says about the objects follows the above.

The calibration comes from the model bundle (`presence` in flmm_bundle.yaml); a plain LMM uses the LMM's own
yes / no (`PresenceCalibration.lmm_only`). A bundle may also hold a head trained for plural phrases
(plural_head.py), which then grounds them before they are split into instances, and an instance filter
(`instances` in flmm_bundle.yaml, instance_filter.py) that decides which of the split instances to keep.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import answers
from .bundle import is_bundle, read_bundle_spec
from .instance_filter import InstanceCalibration
from .instances import MAX_OVERLAP, Instance, InstanceSplitter, is_plural, names_no_kind, presence_probe
from .kind_check import KindScorer
from .lmm import GROUNDING_PROMPT
from .plural_head import load_plural_head, plural_head_path
from .presence import PresenceCalibration, PresenceJudge, answer_token_ids
from .relations import NearRelation, RelationCalibration, distances, every, parse_near
from .sam.prompts import mask_to_box
from .track_cues import mask_iou
from .types import GroundedObject, GroundingResult

log = logging.getLogger(__name__)
ANSWER_BRANCHES = 2       # alternatives tried at each branching step of a constrained answer
DESCRIPTION_TOKENS = 64   # the description that names "all the objects" (a scene of 5 objects takes ~35)


def presence_calibration_of(model: str) -> PresenceCalibration:
    """The bundle's presence calibration, or the LMM-only fallback (a plain LMM, or a bundle without one)."""
    if is_bundle(model):
        spec = read_bundle_spec(model).get("presence")
        if spec:
            return PresenceCalibration.from_spec(spec)
        log.info("%s has no presence calibration: presence is the LMM's own yes / no", Path(model).name)
    return PresenceCalibration.lmm_only()


def instance_calibration_of(model: str) -> InstanceCalibration | None:
    """The bundle's instance filter (instance_filter.py), or None: every instance SAM separates is kept."""
    spec = read_bundle_spec(model).get("instances") if is_bundle(model) else None
    return InstanceCalibration.from_spec(spec) if spec else None


def relation_calibration_of(model: str) -> RelationCalibration | None:
    """The bundle's relation calibration (relations.py), or None: relations are not checked."""
    spec = read_bundle_spec(model).get("relations") if is_bundle(model) else None
    return RelationCalibration.from_spec(spec) if spec else None


def absent(obj: GroundedObject, presence: float) -> GroundedObject:
    """The object of a phrase judged absent: kept, but with nothing a robot could act on."""
    return replace(obj, mask=np.zeros_like(obj.mask), box=(0, 0, 0, 0), score=0.0, found=False, presence=presence,
                   instance=0)


def _one(logits, k: int):
    """Phrase k's part of GroundingLogits (what presence features read), as a one-phrase GroundingLogits."""
    def pick(t):
        return None if t is None else t[k:k + 1]

    lmm = logits.lmm
    if lmm is not None:
        lmm = replace(lmm, maps=lmm.maps[k:k + 1], hidden_states=lmm.hidden_states[k:k + 1],
                      token_logprobs=None if lmm.token_logprobs is None else lmm.token_logprobs[k:k + 1])
    return replace(logits, coarse=logits.coarse[k:k + 1], refined=pick(logits.refined), iou=pick(logits.iou),
                   tokens=None if logits.tokens is None else logits.tokens[k:k + 1], lmm=lmm)


def _instance_object(obj: GroundedObject, instance: Instance, presence: float, index: int) -> GroundedObject:
    """`obj` with the mask, box and score of one of its instances (index 1, 2, ...; 0: the phrase's one object)."""
    box = tuple(int(v) for v in mask_to_box(torch.from_numpy(instance.mask)).tolist())
    return replace(obj, mask=instance.mask.astype(np.uint8) * 255, box=box, score=instance.score, presence=presence,
                   instance=index)


def not_found(phrases: list[str], objects: list[GroundedObject]) -> list[str]:
    """The phrases with no found object, in phrase order."""
    found = {o.phrase for o in objects if o.found}
    return [p for p in phrases if p not in found]


class TrustMixin:
    """Presence decisions, instance splitting and the grounded answer for GroundingPipeline. Uses its LMM,
    refiner and config under its lock; the judge (calibration + yes / no ids) is made on first use."""

    _presence_judge: PresenceJudge | None = None
    _plural: object | None = None      # a GroundingPipeline on the plural head, sharing the LMM (plural_head.py)
    instance_calibration: InstanceCalibration | None = None   # the bundle's instance filter (instance_filter.py)
    relation_calibration: RelationCalibration | None = None   # P(a nearness relation holds) (relations.py)

    def load_trust_parts(self) -> None:
        """Read the bundle's presence calibration, instance filter, relation calibration and plural head now (errors
        at load time, not mid-instruction)."""
        self._presence_judge = PresenceJudge(self.lmm, presence_calibration_of(self.config.model))
        self.instance_calibration = instance_calibration_of(self.config.model)
        self.relation_calibration = relation_calibration_of(self.config.model)
        path = plural_head_path(self.config.model)
        if path is not None and self.refiner is not None:
            head = load_plural_head(self.head, path)
            self._plural = type(self)(self.lmm, head, self._refiner(self.config, head), self.config,
                                      self._mask_head_engine(self.config, head, self.lmm))

    @property
    def presence_judge(self) -> PresenceJudge:
        if self._presence_judge is None:
            self._presence_judge = PresenceJudge(self.lmm, presence_calibration_of(self.config.model))
        return self._presence_judge

    def set_presence_calibration(self, calibration: PresenceCalibration) -> None:
        """Use this calibration from the next instruction (the calibration tool scores candidates this way)."""
        self._presence_judge = PresenceJudge(self.lmm, calibration)

    def _trusted_objects(self, frame, phrases: list[str], logits, objects: list[GroundedObject]
                         ) -> list[GroundedObject]:
        """Presence decision per phrase; plural phrases split into instances (see the module docstring)."""
        cfg, judge = self.config, self.presence_judge
        splits = cfg.instances == "auto" and logits.refined is not None and frame.sam is not None
        checks_relations = splits and cfg.relations == "auto" and self.relation_calibration is not None
        described = [splits and names_no_kind(p) for p in phrases]   # "all the objects": what the LMM describes
        judged = judge.enabled and not all(described)                  # (presence is not read for those)
        values = self.presence_features(frame, phrases, logits) if judged else [{} for _ in phrases]
        out = []
        for k, obj in enumerate(objects):
            if described[k]:
                out += self._described_objects(frame, obj)
                continue
            presence = judge.probability(values[k])
            relation = checks_relations and parse_near(phrases[k])
            if relation:        # judged with the instances it names (relations.py), not before
                out += self._related_objects(frame, obj, presence, relation, is_plural(phrases[k]))
            elif presence < cfg.presence_threshold:
                out.append(absent(obj, presence))
            elif splits and is_plural(phrases[k]):
                out += self._instances(frame, logits, k, obj, presence)
            else:
                out.append(replace(obj, presence=presence))
        return out

    def presence_features(self, frame, phrases: list[str], logits, judge: PresenceJudge | None = None
                          ) -> list[dict[str, float | None]]:
        """The presence features of each phrase, read from the grounding of its presence probe: the phrase itself,
        or, for a plural phrase or one with place, size or relation words, the object it names ("all the mugs",
        "the left mug", "the ball next to the bowl" -> "the mug", "the mug", "the ball"; instances.presence_probe),
        grounded in one more pass. The LMM knows those best, and one calibration serves all."""
        judge = judge or self.presence_judge
        thr, hw = self.config.mask_threshold, frame.image_hw
        probes = [presence_probe(p) for p in phrases]
        if probes == list(phrases):
            return judge.features(frame.lmm, phrases, logits, hw, thr)
        values = [None] * len(phrases)
        for k, (phrase, probe) in enumerate(zip(phrases, probes)):
            if probe == phrase:
                values[k] = judge.features(frame.lmm, [phrase], _one(logits, k), hw, thr)[0]
        other = [k for k in range(len(phrases)) if values[k] is None]
        asked = [probes[k] for k in other]
        logits = self.ground_logits(frame, asked, questions=self.presence_questions(asked, judge))
        for k, v in zip(other, judge.features(frame.lmm, asked, logits, hw, thr)):
            values[k] = v
        return values

    def presence_questions(self, phrases: list[str], judge: PresenceJudge | None = None) -> list[str]:
        """The presence questions the grounding pass of `phrases` can ask beside them (lmm.phrase_pass
        `questions`): those of the phrases judged by themselves (their presence probe is the phrase)."""
        judge = judge or self.presence_judge
        asked = (judge.question(p) for p in phrases if presence_probe(p) == p)
        return [q for q in asked if q is not None]

    def split_instances(self, frame, logits, k: int, phrase: str) -> list[Instance]:
        """Phrase k's instances (instances.py; the plural head grounds it again when the bundle has one), with the
        instance filter's evidence when there is a calibration (the LMM's look at each instance alone, when it
        uses that: kind_check.py)."""
        grounder, index = self, k
        if self._plural is not None:   # the plural head grounds the phrase again from the same LMM pass
            grounder, index = self._plural, 0
            logits = grounder.head_logits(_one(logits, k).lmm, frame.lmm.prepared, frame.sam)
        calibration = self.instance_calibration
        if calibration is not None and self.config.instance_threshold >= 0:    # the user's trade-off
            calibration = replace(calibration, threshold=self.config.instance_threshold)
        scorer = None
        if calibration is not None and calibration.uses_kind:
            scorer = KindScorer(self.lmm, calibration.kind_check, presence_probe(phrase))
        splitter = InstanceSplitter(grounder.refiner, self.config.max_instances, self.config.mask_threshold,
                                    calibration, scorer)
        return splitter.split(frame.sam, logits.coarse[index], logits.refined[index].float().sigmoid(),
                              logits.tokens[index], getattr(frame, "image", None))

    def _instances(self, frame, logits, k: int, obj: GroundedObject, presence: float) -> list[GroundedObject]:
        found = self.split_instances(frame, logits, k, obj.phrase)
        if not found:   # the phrase's mask held no object-sized instance
            return [absent(obj, presence)]
        return [_instance_object(obj, instance, presence, i) for i, instance in enumerate(found, start=1)]

    def near_relation(self, frame, relation: NearRelation, obj: GroundedObject
                      ) -> tuple[float, list[tuple[Instance, float]]]:
        """How surely the anchor is there, and the instances a nearness relation may name with their centre distances
        to the anchor, nearest first (relations.py): the anchor is the instance of "all the <anchor>s" the LMM most
        surely calls one (the anchor grounded alone when there is none, or when it is named with place or size
        words), there as surely as its presence or the instance filter's belief in it says; the targets are the
        instances of "all the <target>s" (F-LMM's mask of the phrase, `obj`, when there is none) that are not the
        anchor. No instances when there is no anchor or no target apart from it."""
        name, hw = relation.anchor, frame.image_hw
        logits = self.ground_logits(frame, [name], questions=self.presence_questions([name]))
        believed = self.presence_judge.probability(self.presence_features(frame, [name], logits)[0])
        anchors = self._every(frame, name) if presence_probe(name) == name else []
        if anchors:
            best = max(anchors, key=lambda a: a.features.get("lmm_kind", a.iou * a.score))
            anchor, believed = best.mask, max(believed, self._believed(best))
        else:
            anchor = self._objects([name], logits, hw)[0].mask > 0
        if not anchor.any():
            return believed, []
        targets = self._every(frame, presence_probe(relation.target)) or [Instance(obj.mask > 0, 1.0, obj.score)]
        return believed, [(targets[i], d) for i, d in distances([t.mask for t in targets], anchor)]

    def _believed(self, instance: Instance) -> float:
        """The instance filter's belief that an instance is an object of its phrase (0 without a filter)."""
        calibration = self.instance_calibration
        return calibration.probability(instance.features) if calibration is not None and instance.features else 0.0

    def _every(self, frame, phrase: str) -> list[Instance]:
        """The instances of every object like `phrase` ("the red mug" -> "all the red mugs")."""
        plural = every(phrase)
        return self.split_instances(frame, self.ground_logits(frame, [plural]), 0, plural)

    def _related_objects(self, frame, obj: GroundedObject, presence: float, relation: NearRelation, plural: bool
                         ) -> list[GroundedObject]:
        """A nearness phrase's objects: the nearest instance (a plural phrase: every instance) with presence P(the
        object is there) x P(the anchor is there) x P(the relation holds) at the threshold or above. The object is
        there as surely as the phrase's presence or the instance filter's belief in that instance says, whichever is
        surer (relations.py). None: the phrase not found, with the best presence."""
        anchor_there, near = self.near_relation(frame, relation, obj)
        judged = [(instance, max(presence, self._believed(instance)) * anchor_there
                   * self.relation_calibration.probability(distance))
                  for instance, distance in near[:None if plural else 1]]
        kept = [(i, p) for i, p in judged if p >= self.config.presence_threshold]
        if not kept:     # (or nothing to judge, which presence_threshold 0 still publishes as F-LMM's mask)
            best = max((p for _, p in judged), default=0.0)
            return [absent(obj, best) if best < self.config.presence_threshold else replace(obj, presence=best)]
        kept = sorted(kept[:self.config.max_instances], key=lambda ip: np.nonzero(ip[0].mask.any(0))[0][0])
        return [_instance_object(obj, i, p, n if plural else 0) for n, (i, p) in enumerate(kept, start=1)]

    def _described_objects(self, frame, obj: GroundedObject) -> list[GroundedObject]:
        """The instances of a plural phrase that names no kind or colour ("the objects", "every object"): neither
        the presence question ("is there the object?") nor the phrase's attention means anything for it, so its
        instances are the objects the LMM's own description of the frame names ("a red mug on the left, a blue
        bowl ..."), each grounded from the description's tokens (grounded conversation, answer_grounding.py),
        masks of one object said twice dropped, left to right. Presence 1 for each; none: the phrase not found."""
        _, found, logits = self._run_conversation(frame.lmm, frame.sam, GROUNDING_PROMPT, self._clock(),
                                                  self.lmm.generate_ids(frame.lmm, GROUNDING_PROMPT,
                                                                        DESCRIPTION_TOKENS))
        kept: list[GroundedObject] = []
        for named in self._objects([p.text for p in found], logits, frame.image_hw) if found else []:
            mask = named.mask > 0
            if mask.sum() and all(mask_iou(mask, k.mask > 0) <= MAX_OVERLAP for k in kept):
                kept.append(named)
        kept = sorted(kept[:self.config.max_instances], key=lambda o: o.box[0])
        if not kept:
            return [absent(obj, 0.0)]
        return [replace(named, phrase=obj.phrase, presence=1.0, instance=i) for i, named in enumerate(kept, 1)]

    def _trusted_answer(self, frame, instruction: str, phrases: list[str], objects: list[GroundedObject]) -> str:
        """The spoken answer: the LMM's own (`answer_source: lmm`) or one that follows the objects (answers.py)."""
        if self.config.answer_source == "lmm":
            return self.lmm.generate(frame.lmm, instruction, self.config.max_new_tokens)
        return answers.grounded_answer(instruction, phrases, objects,
                                       lambda prefix, banned: self._constrained(frame, instruction, prefix, banned))

    def _constrained(self, frame, instruction: str, prefix: str, banned: list[str]) -> str:
        """The LMM's continuation after a forced `prefix`; or, with `banned` words, its most likely answer that never
        uses one. Decoding token by token with the words removed can leave the sentence the LMM began ("there is no"
        -> "there is yes", "is in the middle" -> "is in the right"), so where a ban bites, the search also
        branches at the first step and at the two steps before, and keeps the likeliest whole answer."""
        lmm, limit = self.lmm, self.config.max_new_tokens
        if prefix or not banned:     # the continuation only (answers.grounded_answer puts the prefix in front)
            return lmm.generate(frame.lmm, instruction, limit, prefix)
        spellings = tuple(v for w in banned for v in (w, w.capitalize(), f" {w}", f" {w.capitalize()}"))
        banned_ids = answer_token_ids(lmm.tokenizer, spellings)
        best = lmm.generate_scored(frame.lmm, instruction, limit, [], banned_ids, ANSWER_BRANCHES)
        if best.conflict is not None:
            first = best
            for step in sorted({0, first.conflict - 2, first.conflict - 1} & set(range(first.conflict))):
                for token in first.alternatives[step]:
                    other = lmm.generate_scored(frame.lmm, instruction, limit, first.ids[:step] + [token], banned_ids,
                                                ANSWER_BRANCHES)
                    if other.logprob > best.logprob:
                        best = other
        return lmm.tokenizer.decode(best.ids, skip_special_tokens=True).strip()

    @staticmethod
    def _with_not_found(result: GroundingResult) -> GroundingResult:
        result.not_found = not_found(result.phrases, result.objects)
        return result
