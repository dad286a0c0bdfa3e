"""Shape World: procedural scenes with an exact edit operation for every X2Edit task.

    from x2edit.data_pipeline.shapeworld import ShapeWorld
    sw = ShapeWorld(resolution=64)
    pair = sw.sample(seed=0, task="color_change")      # EditPair: source, target, mask, instruction, ...
    for pair in sw.eval_pairs(n_per_task=20): ...      # the fixed held-out evaluation set
    colors = sw.panel_set(seed=0, n_panels=3)           # PanelSet: one object in 3 colours (IC-LoRA sets)
"""

from x2edit.data_pipeline.shapeworld.render import Renderer
from x2edit.data_pipeline.shapeworld.scene import Background, Camera, Obj, Scene
from x2edit.data_pipeline.shapeworld.world import SHAPEWORLD_VERSION, SPLITS, EditPair, PanelSet, ShapeWorld

__all__ = ["SHAPEWORLD_VERSION", "SPLITS", "Background", "Camera", "EditPair", "Obj", "PanelSet", "Renderer",
           "Scene", "ShapeWorld"]
