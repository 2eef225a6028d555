"""Shapes World: the embedded default domain and its exact evaluator (../shared/WORLD.md)."""

from kino.world.captions import Caption, WorldObject, format_caption, parse_caption
from kino.world.evaluator import ClipResult, evaluate_clip, summarize
from kino.world.generator import Scene, render, sample_clips, sample_scene, scene_at

__all__ = ["Caption", "WorldObject", "format_caption", "parse_caption", "ClipResult",
           "evaluate_clip", "summarize", "Scene", "render", "sample_clips", "sample_scene", "scene_at"]
