-- wrk script for `python -m bench --request body`: POST a 16 KiB JSON document (the cost of reading,
-- buffering and forwarding a request body). The same body every time, so wrk formats the request once.
-- The JSON report line comes from report.lua, next to this file.
local items = {}
for i = 1, 220 do
  items[#items + 1] = string.format('{"id":%d,"sku":"SKU-%06d","qty":%d,"note":"ordinary line item"}', i, i * 7, i % 9)
end
local body = '{"order":"bench","items":[' .. table.concat(items, ",") .. ']}'
body = body .. string.rep(" ", 16384 - #body)  -- exactly 16 KiB
wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")
