-- wrk script for `python -m bench --request jwt`: GET with `Authorization: Bearer <token>`, cycling through
-- the tokens of a file (one a line; the bench mints 1,000 distinct RS256 tokens with auth_stub), so the
-- proxy's verified-token cache holds many tokens, as it would in front of many clients. Script arguments
-- (after `--`): the token file, then optionally a Host value (the bench's JWT route is chosen by Host;
-- without one the request goes to the same path on the route without auth). Every request is formatted
-- once, in init; wrk then only picks the next one. The JSON report line comes from report.lua.
local requests = {}
local count = 0
local index = 0

function init(args)
  local path = args[1]
  local host = args[2]
  local file = assert(io.open(path, "r"), "cannot open the token file " .. tostring(path))
  for token in file:lines() do
    if #token > 0 then
      local headers = { ["Authorization"] = "Bearer " .. token }
      if host ~= nil and #host > 0 then
        headers["Host"] = host
      end
      count = count + 1
      requests[count] = wrk.format("GET", nil, headers)
    end
  end
  file:close()
  assert(count > 0, "no token in " .. path)
  index = math.random(count) - 1  -- each thread (and connection set) starts elsewhere in the list
end

function request()
  index = index % count + 1
  return requests[index]
end

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")
