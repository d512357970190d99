// Greedy answers from a vlmedge generative export, loaded as written by transformers.js (Node, onnxruntime-node,
// a local folder, no hub): node generate.mjs FOLDER JOBS.json, where JOBS.json is
// {"dtypes": ["fp32", "q8", "q4"], "max_new_tokens": 16, "ignore_eos": false, "pixels_dir": null,
//  "items": [{"image": "a.png", "question": "..."}]}.
// Prints {dtype: [{prompt: [ids], ids: [generated ids], pixels: [dims]}]} as JSON. With "ignore_eos", exactly
// max_new_tokens (no EOS stop); with "pixels_dir", each item's pixel_values (float32, little-endian) are written
// there as K.f32, for a comparison of the processors and of the graphs on the same pixels.
import { readFileSync, writeFileSync } from "node:fs";
import { AutoProcessor, AutoModelForVision2Seq, RawImage, env } from "@huggingface/transformers";

env.allowRemoteModels = false;
env.localModelPath = "/";
const [folder, jobsPath] = process.argv.slice(2);
const jobs = JSON.parse(readFileSync(jobsPath, "utf8"));
const processor = await AutoProcessor.from_pretrained(folder);
const options = { max_new_tokens: jobs.max_new_tokens, do_sample: false, ...(jobs.ignore_eos ? { eos_token_id: null } : {}) };
const out = {};
for (const dtype of jobs.dtypes) {
  const model = await AutoModelForVision2Seq.from_pretrained(folder, { dtype, device: "cpu" });
  out[dtype] = [];
  for (const [k, item] of jobs.items.entries()) {
    const messages = [{ role: "user", content: [{ type: "image" }, { type: "text", text: item.question }] }];
    const prompt = processor.apply_chat_template(messages, { add_generation_prompt: true });
    const inputs = await processor(prompt, [await RawImage.read(item.image)]);
    if (jobs.pixels_dir && dtype === jobs.dtypes[0]) {
      const data = inputs.pixel_values.data;
      writeFileSync(`${jobs.pixels_dir}/${k}.f32`, Buffer.from(data.buffer, data.byteOffset, data.byteLength));
    }
    const ids = await model.generate({ ...inputs, ...options });
    const n = inputs.input_ids.dims[1];
    out[dtype].push({ prompt: Array.from(inputs.input_ids.data, Number), pixels: inputs.pixel_values.dims,
                      ids: Array.from(ids.slice(null, [n, null]).data, Number) });
  }
  await model.dispose();
}
console.log(JSON.stringify(out));
