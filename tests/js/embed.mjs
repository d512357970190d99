// Embeddings from a vlmedge dual-encoder export in the onnx-community layout, loaded as written by transformers.js
// (the towers' classes: CLIPVisionModelWithProjection / CLIPTextModelWithProjection by default; AutoProcessor,
// AutoTokenizer; a local folder, no hub): node embed.mjs FOLDER JOBS.json, where JOBS.json is {"dtypes": ["fp32",
// "q8"], "classes": ["SiglipVisionModel", "SiglipTextModel"], "images": ["a.png"], "texts": ["a red circle"]}. Prints {input_ids: [[...]], dtype: {image_embeds: [[...]], text_embeds: [[...]]}} as
// JSON (the texts padded to the longest).
import { readFileSync } from "node:fs";
import * as transformers from "@huggingface/transformers";

const { AutoProcessor, AutoTokenizer, RawImage, env } = transformers;

env.allowRemoteModels = false;
env.localModelPath = "/";
const [folder, jobsPath] = process.argv.slice(2);
const jobs = JSON.parse(readFileSync(jobsPath, "utf8"));
const processor = await AutoProcessor.from_pretrained(folder);
const tokenizer = await AutoTokenizer.from_pretrained(folder);
const images = await Promise.all(jobs.images.map((p) => RawImage.read(p)));
const tokens = tokenizer(jobs.texts, { padding: true, truncation: true });
const [Vision, Text] = (jobs.classes ?? ["CLIPVisionModelWithProjection", "CLIPTextModelWithProjection"])
  .map((name) => transformers[name]);
const out = { input_ids: tokens.input_ids.tolist().map((row) => row.map(Number)) };
for (const dtype of jobs.dtypes) {
  const vision = await Vision.from_pretrained(folder, { dtype, device: "cpu" });
  const text = await Text.from_pretrained(folder, { dtype, device: "cpu" });
  const { image_embeds } = await vision(await processor(images));
  const { text_embeds } = await text(tokens);
  out[dtype] = { image_embeds: image_embeds.tolist(), text_embeds: text_embeds.tolist() };
  await vision.dispose();
  await text.dispose();
}
console.log(JSON.stringify(out));
