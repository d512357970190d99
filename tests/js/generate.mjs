// Greedy answers from a vlmedge generative export, loaded as written by transformers.js (Node, onnxruntime-node,
// a local folder, no hub): node generate.mjs FOLDER JOBS.json, where JOBS.json is
// {"dtypes": ["fp32", "q8", "q4"], "max_new_tokens": 16, "items": [{"image": "a.png", "question": "..."}]}.
// Prints {dtype: [{prompt: [ids], ids: [generated ids]}]} as JSON.
import { readFileSync } from "node:fs";
import { AutoProcessor, AutoModelForVision2Seq, RawImage, env } from "@huggingface/transformers";

env.allowRemoteModels = false;
env.localModelPath = "/";
const [folder, jobsPath] = process.argv.slice(2);
const jobs = JSON.parse(readFileSync(jobsPath, "utf8"));
const processor = await AutoProcessor.from_pretrained(folder);
const out = {};
for (const dtype of jobs.dtypes) {
  const model = await AutoModelForVision2Seq.from_pretrained(folder, { dtype, device: "cpu" });
  out[dtype] = [];
  for (const item of jobs.items) {
    const messages = [{ role: "user", content: [{ type: "image" }, { type: "text", text: item.question }] }];
    const prompt = processor.apply_chat_template(messages, { add_generation_prompt: true });
    const inputs = await processor(prompt, [await RawImage.read(item.image)]);
    const ids = await model.generate({ ...inputs, max_new_tokens: jobs.max_new_tokens, do_sample: false });
    const n = inputs.input_ids.dims[1];
    out[dtype].push({ prompt: Array.from(inputs.input_ids.data, Number),
                      ids: Array.from(ids.slice(null, [n, null]).data, Number) });
  }
  await model.dispose();
}
console.log(JSON.stringify(out));
