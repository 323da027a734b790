-- wrk script of the `rejecting` scenario: wrk's plain GET, counting the answers with status 429 apart from
-- errors. wrk counts every status >= 400 as a status error; each thread counts its 429s here and report.lua
-- prints their sum as `rejected` (bench/wrk_runner.py takes them out of the status errors). Defining
-- `response` makes wrk hand every answer to Lua, which costs the load generator a little per request.
local threads = {}

function setup(thread)
  thread:set("rejected", 0)
  table.insert(threads, thread)
end

rejected = 0

function response(status, headers, body)
  if status == 429 then
    rejected = rejected + 1
  end
end

-- Read by report.lua's done (main state): the 429s of every thread.
function rejected_total()
  local total = 0
  for _, thread in ipairs(threads) do
    total = total + thread:get("rejected")
  end
  return total
end

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")
